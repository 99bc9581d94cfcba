"""Database engine and migrations: SQLite (embedded default) or PostgreSQL, same code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

MIGRATIONS = Path(__file__).parent / "migrations"


# Connections kept open per process. `serve` runs the API's thread pool (40 threads), the
# scheduler, the Tinker dispatcher and a collector per host on one engine: with SQLAlchemy's
# default (5 kept) most of a busy second's connections were opened and closed again, each
# with its PRAGMAs (seen in bench/primitives.py's profile).
SQLITE_POOL, POSTGRES_POOL = 32, 10


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(
            url, pool_pre_ping=True, pool_size=POSTGRES_POOL, max_overflow=2 * POSTGRES_POOL
        )
    database = parsed.database or ":memory:"
    in_memory = database == ":memory:"
    if not in_memory:
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    pool = {} if in_memory else {"pool_size": SQLITE_POOL, "max_overflow": SQLITE_POOL}
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        # WAL lets the API read while the scheduler writes; the busy timeout makes a writer
        # wait for the other instead of failing at once.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def migrate(engine: Engine) -> None:
    """Brings the schema to the newest revision (run on every start; a no-op when current)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
