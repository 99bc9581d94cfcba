"""merges: merged-weights requests (one per job, checkpoint and scale); jobs.model_deleted_at

A merge is asked for through the API and run by the scheduler as a Ray task; its row says
where it stands (queued, running, succeeded, failed) and how many bytes its cached shards
hold in the store (counted in the tenant's storage). A job whose fine-tuned model was
deleted (DELETE /v1/models/{model}) stays, with the time of the deletion.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "merges",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False, index=True),
        sa.Column("job_id", sa.String(64), nullable=False, index=True),
        sa.Column("checkpoint", sa.String(64), nullable=False),
        sa.Column("scale", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("bytes", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("error", sa.Text),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("started_at", sa.BigInteger),
        sa.Column("heartbeat_at", sa.Float),
        sa.Column("finished_at", sa.BigInteger),
        sa.UniqueConstraint("job_id", "checkpoint", "scale", name="uq_merge_per_scale"),
    )
    op.add_column("jobs", sa.Column("model_deleted_at", sa.BigInteger, nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "model_deleted_at")
    op.drop_table("merges")
