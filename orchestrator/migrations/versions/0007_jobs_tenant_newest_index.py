"""An index for a tenant's newest jobs: the list page stops after limit + 1 rows instead of
sorting every job the tenant has.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_tenant_newest", "jobs", ["tenant", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_newest", table_name="jobs")
