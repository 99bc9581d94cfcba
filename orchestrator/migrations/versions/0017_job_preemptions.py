"""jobs.preemptions: how many times the job's host was lost to a preempted node (issue 18)

A host whose control node was preempted (Ray's drain with a deadline, a spot notice) costs
its jobs a preemption of their own budget (`max_preemptions_per_job`), not an attempt. A
plain ADD COLUMN on both databases (no table rebuild, so SQLite keeps migration 0008's
trigger); existing jobs start at 0.

Revision ID: 0017
Revises: 0016
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("preemptions", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    # A plain DROP COLUMN too (SQLite ≥ 3.35): a batch rebuild would lose 0008's trigger.
    op.drop_column("jobs", "preemptions")
