"""jobs.result_files: the ids of the files a job left when it ended (its results CSV)

A plain ADD COLUMN on both databases (no table rebuild, so SQLite keeps migration 0008's
trigger); jobs that ended before have none.

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("result_files", sa.JSON, nullable=True))


def downgrade() -> None:
    # A plain DROP COLUMN too (SQLite ≥ 3.35): a batch rebuild would lose 0008's trigger.
    op.drop_column("jobs", "result_files")
