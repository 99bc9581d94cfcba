"""job_events.job_seq: each job's events numbered 1, 2, 3 … under the job's row lock;
webhook_deliveries.last_status_class

`seq` comes from one sequence for every job, and PostgreSQL transactions commit out of
sequence order: a reader that had seen seq 10 and asked for `seq > 10` never saw seq 9
committed after it. A job's numbers are now taken while its row is locked, so they commit in
order and a reader of one job (SSE, `after=` pages) cannot skip one. Existing events are
numbered in their `seq` order.

A delivery keeps the class of its last answer (2xx … 5xx, unreachable), shown to its tenant
instead of the network's own error text, which old rows lose.

Plain ADD COLUMN and CREATE INDEX on both databases (no table rebuild: SQLite keeps 0008's
trigger on jobs).

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("job_events", sa.Column("job_seq", sa.Integer, nullable=True))
    op.execute(
        "UPDATE job_events SET job_seq = (SELECT count(*) FROM job_events AS earlier "
        "WHERE earlier.job_id = job_events.job_id AND earlier.seq <= job_events.seq)"
    )
    op.create_index("uq_job_events_job_seq", "job_events", ["job_id", "job_seq"], unique=True)
    op.add_column(
        "webhook_deliveries", sa.Column("last_status_class", sa.String(16), nullable=True)
    )
    op.execute("UPDATE webhook_deliveries SET last_error = NULL")


def downgrade() -> None:
    op.drop_column("webhook_deliveries", "last_status_class")
    op.drop_index("uq_job_events_job_seq", table_name="job_events")
    op.drop_column("job_events", "job_seq")
