"""jobs.estimated_finish: when a running job should end (OpenAI's `estimated_finish`, unix
seconds), from its measured time per step; the scheduler writes it as the job's steps arrive.

A plain ADD COLUMN on both databases (no table rebuild, so SQLite keeps migration 0008's
trigger).

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("estimated_finish", sa.BigInteger, nullable=True))


def downgrade() -> None:
    # A plain DROP COLUMN too (SQLite ≥ 3.35): a batch rebuild would lose 0008's trigger.
    op.drop_column("jobs", "estimated_finish")
