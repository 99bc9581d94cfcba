"""PostgreSQL `LISTEN` for the store's wake-ups (`orchestrator.store.changes`): a thread
with a connection of its own hears every process's new jobs and events (and Tinker requests
and answers) and wakes this process's waiters (the scheduler, the Tinker dispatcher, the
API's live streams and futures) at once.

The database may go away: the thread then says so once, tries again every
`RECONNECT_SECONDS`, and once connected again wakes every waiter (notifications sent while
it was away are lost; the waiters look for themselves). Nothing waits on it: each waiter
keeps its poll.
"""

from __future__ import annotations

import logging
import threading

import psycopg
from sqlalchemy import Engine

from orchestrator.store.changes import (
    EVENTS_CHANNEL,
    JOBS_CHANNEL,
    TINKER_ANSWERS_CHANNEL,
    TINKER_REQUESTS_CHANNEL,
    Changes,
)

log = logging.getLogger(__name__)

RECONNECT_SECONDS = 1.0
# How long one wait for notifications lasts before the thread looks at its stop flag.
WAIT_SECONDS = 0.5
CONNECT_TIMEOUT_SECONDS = 5


class ChangeListener:
    def __init__(self, engine: Engine, changes: Changes) -> None:
        # The engine's own URL as libpq reads it (the password kept, the driver name not).
        self.conninfo = engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False
        )
        self.changes = changes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="db-listener", daemon=True)
        self.listening = threading.Event()  # connected and listening now (tests wait for it)

    def start(self) -> ChangeListener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=WAIT_SECONDS + CONNECT_TIMEOUT_SECONDS)

    def _run(self) -> None:
        away = False
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self.conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS
                ) as conn:
                    conn.execute(f"LISTEN {JOBS_CHANNEL}")
                    conn.execute(f"LISTEN {EVENTS_CHANNEL}")
                    conn.execute(f"LISTEN {TINKER_REQUESTS_CHANNEL}")
                    conn.execute(f"LISTEN {TINKER_ANSWERS_CHANNEL}")
                    self.listening.set()
                    if away:
                        log.warning("listening for database notifications again")
                        away = False
                    self.changes.everything()  # what was said while not listening is lost
                    self._hear(conn)
            except psycopg.Error as exc:
                self.listening.clear()
                if not away:  # once per outage
                    log.warning(
                        "not listening for database notifications (polls only until it is "
                        "back): %s",
                        exc,
                    )
                away = True
                self._stop.wait(RECONNECT_SECONDS)
        self.listening.clear()

    def _hear(self, conn: psycopg.Connection) -> None:
        while not self._stop.is_set():
            for note in conn.notifies(timeout=WAIT_SECONDS):
                if note.channel == JOBS_CHANNEL:
                    self.changes.new_jobs()
                elif note.channel == TINKER_REQUESTS_CHANNEL:
                    self.changes.new_tinker_requests()
                elif note.channel == TINKER_ANSWERS_CHANNEL:
                    self.changes.tinker_answers(note.payload.split(","))
                else:
                    self.changes.new_events([note.payload])


def listen_for_changes(engine: Engine, changes: Changes) -> ChangeListener | None:
    """A started listener on PostgreSQL; None on SQLite (one process: its own commits
    already say everything; other processes on the same file fall back to their polls)."""
    if engine.dialect.name != "postgresql":
        return None
    return ChangeListener(engine, changes).start()
