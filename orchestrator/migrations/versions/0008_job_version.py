"""jobs.version: a number that every UPDATE of a job row raises, kept by a trigger

The API keys its cache of job response bodies on (id, version): a list page reads only its
jobs' ids and versions, and the whole row only of a job whose version it has not rendered.
A trigger, not the store's code, raises it, so no write path can forget to (a raw UPDATE by
an operator included). SQLite keeps a table's triggers only while the table exists: a later
migration that rebuilds `jobs` (batch mode) must create the trigger again
(tests/orchestrator/test_job_version.py fails if it is gone).

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

SQLITE_TRIGGER = """
CREATE TRIGGER jobs_version_bump AFTER UPDATE ON jobs FOR EACH ROW
WHEN NEW.version = OLD.version
BEGIN
    UPDATE jobs SET version = OLD.version + 1 WHERE id = NEW.id;
END
"""
POSTGRES_FUNCTION = """
CREATE FUNCTION jobs_version_bump() RETURNS trigger AS $$
BEGIN
    NEW.version := OLD.version + 1;
    RETURN NEW;
END
$$ LANGUAGE plpgsql
"""
POSTGRES_TRIGGER = """
CREATE TRIGGER jobs_version_bump BEFORE UPDATE ON jobs FOR EACH ROW
EXECUTE FUNCTION jobs_version_bump()
"""


def upgrade() -> None:
    op.add_column("jobs", sa.Column("version", sa.BigInteger, nullable=False, server_default="0"))
    if op.get_bind().dialect.name == "sqlite":
        # Its own UPDATE does not fire it again: SQLite's recursive triggers are off, and
        # the WHEN clause would stop it anyway.
        op.execute(SQLITE_TRIGGER)
    else:
        op.execute(POSTGRES_FUNCTION)
        op.execute(POSTGRES_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER jobs_version_bump")
    else:
        op.execute("DROP TRIGGER jobs_version_bump ON jobs")
        op.execute("DROP FUNCTION jobs_version_bump()")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("version")
