"""Drop idempotency_keys.status_code: every stored response is a 200 and it was never read

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode: SQLite cannot drop a column in place on every version.
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_column("status_code")


def downgrade() -> None:
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.add_column(sa.Column("status_code", sa.Integer(), nullable=True))
