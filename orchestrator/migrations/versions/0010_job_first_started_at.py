"""jobs.first_started_at: when the job's first attempt started (its max_runtime counts
from here, across every attempt; started_at is the current attempt's start)

A plain ADD COLUMN on both databases (no table rebuild, so SQLite keeps migration 0008's
trigger). Jobs already started count from their current attempt's start.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("first_started_at", sa.BigInteger, nullable=True))
    op.execute("UPDATE jobs SET first_started_at = started_at WHERE started_at IS NOT NULL")


def downgrade() -> None:
    # A plain DROP COLUMN too (SQLite ≥ 3.35): a batch rebuild would lose 0008's trigger.
    op.drop_column("jobs", "first_started_at")
