"""Wake-ups instead of polls (orchestrator.store.changes): a new job wakes the scheduler
and a job's new events wake its live streams when they commit, in this process (SQLite) and
from another process through PostgreSQL's LISTEN/NOTIFY, which comes back after a database
restart. Each test sets the poll it replaces far longer than its own wait, so a pass shows
the wake-up, not a fast poll."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.db import make_engine, migrate
from orchestrator.scheduling.scheduler import Scheduler
from orchestrator.store import JobStore
from orchestrator.store.changes import Changes
from orchestrator.store.listener import ChangeListener, listen_for_changes
from orchestrator.store.rows import add_events, event_row
from tests.conftest import job_row, require, wait_for_condition
from tests.orchestrator.test_database_outage import start_again, stop_immediately
from tests.orchestrator.test_host_scheduling import make_world
from tests.services import postgres as postgres_service

NEVER = 600.0  # a poll interval no test here waits for
WAIT = 10.0  # how long a wake-up may take here (a loaded CI machine), far below NEVER


class NoRay:
    """The scheduler's Ray connection, for a scheduler on in-memory hosts."""

    def connect(self) -> None: ...
    def connected(self) -> bool:
        return True

    def abandon_start(self) -> None: ...
    def close(self) -> None: ...
    def gpu_available(self) -> bool:
        return False


def test_a_new_job_wakes_the_scheduler_long_before_its_poll(tmp_path: Path) -> None:
    world = make_world(tmp_path, scheduler_poll_seconds=NEVER)
    scheduler = Scheduler(world.settings, world.store, world.objects, NoRay(), world.hosts)  # type: ignore[arg-type]
    ticks: list[float] = []
    tick = scheduler.tick
    scheduler.tick = lambda: (tick(), ticks.append(1))  # type: ignore[method-assign, func-returns-value]
    scheduler.start()
    try:
        # The first tick ran (at start) and found nothing; the next poll is NEVER away.
        wait_for_condition(lambda: len(ticks) == 1, timeout=WAIT, what="the first tick")
        job_id = world.submit()
        wait_for_condition(
            lambda: world.job(job_id).status == "running", timeout=WAIT, what="the claim"
        )
        wait_for_condition(lambda: len(ticks) >= 2, timeout=WAIT)  # the claim's tick ends
        assert len(ticks) == 2  # one tick, woken by the job
    finally:
        scheduler.stop()


def test_changes_wake_only_the_waiters_of_what_changed() -> None:
    changes = Changes()
    woken: list[str] = []
    with changes.on_new_jobs(lambda: woken.append("jobs")):
        changes.new_events(["job-a"])
        assert woken == []
        changes.new_jobs()
        assert woken == ["jobs"]
    changes.new_jobs()  # unsubscribed at the end of the block
    assert woken == ["jobs"]

    async def stream() -> list[bool]:
        with changes.watching_events("job-a") as waiting:
            got = [await waiting.wait(0.01)]  # nothing yet: the fallback poll's timeout
            waiting.clear()
            threading.Thread(target=changes.new_events, args=(["job-b"],)).start()
            got.append(await waiting.wait(0.2))  # another job's events: still nothing
            threading.Thread(target=changes.new_events, args=(["job-a"],)).start()
            got.append(await waiting.wait(NEVER))  # from another thread, as commits come
            waiting.clear()
            changes.everything()  # a listener that reconnected: everyone looks
            got.append(await waiting.wait(NEVER))
        return got

    assert asyncio.run(stream()) == [False, False, True, True]


def test_commits_say_scheduler_work_and_events_and_rollbacks_say_nothing(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    store = JobStore(engine)
    said: list[str] = []
    store.changes.new_jobs = lambda: said.append("jobs")  # type: ignore[method-assign]
    store.changes.new_events = lambda ids: said.extend(sorted(ids))  # type: ignore[method-assign]
    job = store.add_job(job_row(), "created")
    assert said == ["jobs", job.id]
    said.clear()
    store.warn(job.id, job.attempt, "careful", {})
    assert said == [job.id]
    said.clear()
    with pytest.raises(RuntimeError), store.sessions.begin() as session:
        add_events(session, job.id, [event_row(job.id, "never committed")])
        raise RuntimeError("rolled back")
    store.warn(job.id, job.attempt + 5, "a moved-on attempt: no event", {})
    assert said == []
    # The API's requests wake the scheduler too; the scheduler's own moves only streams.
    running = store.add_job(job_row(status="running", attempt=1, run_id="host-x"), "created")
    said.clear()
    store.request_cancel(running.id)
    assert said == ["jobs", running.id]
    said.clear()
    store.queue(job.id, "Files validated; job queued")
    assert said == [job.id]


@pytest.fixture()
def own_postgres() -> Iterator[postgres_service.Postgres]:
    """Not the session's server: a test here restarts it."""
    require(postgres_service.missing())
    server = postgres_service.start_postgres()
    yield server
    server.stop()


@pytest.mark.faults
def test_notifications_reach_another_process_store_and_come_back_after_a_restart(
    own_postgres: postgres_service.Postgres,
) -> None:
    url = own_postgres.create_database("wake_ups")
    # The schema must survive the immediate stop (the test server commits asynchronously).
    own_postgres.psql("ALTER DATABASE wake_ups SET synchronous_commit = on")
    writer = JobStore(make_engine(url))
    migrate(writer.engine)
    reader = JobStore(make_engine(url))  # as another process's: only NOTIFY reaches it
    woken = threading.Event()
    events_of: list[str] = []
    reader.changes.new_jobs = woken.set  # type: ignore[method-assign]
    reader.changes.new_events = lambda ids: events_of.extend(ids)  # type: ignore[method-assign]
    listener = listen_for_changes(reader.engine, reader.changes)
    assert isinstance(listener, ChangeListener)
    try:
        assert listener.listening.wait(WAIT)
        woken.clear()
        job = writer.add_job(job_row(), "created")
        assert woken.wait(WAIT), "no wake-up for a new job"
        wait_for_condition(lambda: job.id in events_of, timeout=WAIT, what="events NOTIFY")

        stop_immediately(own_postgres)
        wait_for_condition(lambda: not listener.listening.is_set(), timeout=WAIT)
        start_again(own_postgres)
        assert listener.listening.wait(WAIT), "the listener did not reconnect"
        woken.clear()
        second = writer.add_job(job_row(), "created after the restart")
        assert woken.wait(WAIT), "no wake-up after the database restarted"
        wait_for_condition(lambda: second.id in events_of, timeout=WAIT)
    finally:
        listener.stop()
        assert not listener._thread.is_alive()
