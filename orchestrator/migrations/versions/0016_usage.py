"""usage: each tenant's usage per UTC day (issue 21), in Tinker's units

One row per (tenant, day): tokens trained, prefilled and sampled, and device-seconds. The
scheduler adds to it in the same transaction that stores what was measured (a job's metrics
events, a Tinker request's answer), so a measurement counts once (orchestrator/usage.py).

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("day", sa.String(10), primary_key=True),  # YYYY-MM-DD, UTC
        sa.Column("tokens_trained", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("tokens_prefilled", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("tokens_sampled", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("device_seconds", sa.Float, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("usage")
