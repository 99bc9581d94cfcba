"""Wake-ups instead of polls: what the store committed (a new job, a job's new events) is
said at once to whoever waits for it in this process, the scheduler's loop and the API's
live event streams. Commits of this process say it directly (`JobStore`'s after-commit
hook); on PostgreSQL the same commits also `NOTIFY`, and `orchestrator.store.listener`
carries other processes' notifications here. Waiters keep their poll as the fallback: a
wake-up only shortens a wait, so one lost (an outage, SQLite across processes) costs a poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from sqlalchemy import func, select
from sqlalchemy.orm import Session

JOBS_CHANNEL = "lorafleet_jobs"  # payload: the id of a job with work for the scheduler
EVENTS_CHANNEL = "lorafleet_events"  # payload: the id of a job with new events
# Tinker requests (orchestrator.tinker.store): a new request row, for the dispatcher
# (payload unused), and a request answered, for its `retrieve_future` (payload: its id).
TINKER_REQUESTS_CHANNEL = "lorafleet_tinker_requests"
TINKER_ANSWERS_CHANNEL = "lorafleet_tinker_answers"
EVERY_JOB = "*"  # "any job may have new events" (notifications were lost: a reconnect)

# What a session has written, kept in `session.info` until it commits.
_NEW_JOBS = "lorafleet_new_jobs"
_EVENTS_OF = "lorafleet_events_of"


class Changes:
    """In-process wake-ups. Thread-safe; callbacks run on the committing (or listening)
    thread, so they only set a flag."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job_waiters: list[Callable[[], None]] = []
        self._event_waiters: dict[str, list[Callable[[], None]]] = defaultdict(list)
        self._request_waiters: list[Callable[[], None]] = []
        self._answer_waiters: dict[str, list[Callable[[], None]]] = defaultdict(list)

    # ---- saying ----
    def new_jobs(self) -> None:
        """A new job, or one the API asked something of: work for the scheduler."""
        self._wake_all(self._job_waiters)

    def new_events(self, job_ids: Iterable[str]) -> None:
        self._wake_keyed(self._event_waiters, job_ids)

    def new_tinker_requests(self) -> None:
        """A Tinker request row was written: work for the dispatcher."""
        self._wake_all(self._request_waiters)

    def tinker_answers(self, request_ids: Iterable[str]) -> None:
        """Tinker requests answered (EVERY_JOB: any may have been)."""
        self._wake_keyed(self._answer_waiters, request_ids)

    def _wake_all(self, book: list[Callable[[], None]]) -> None:
        with self._lock:
            waiters = list(book)
        for wake in waiters:
            wake()

    def _wake_keyed(self, book: dict[str, list[Callable[[], None]]], keys: Iterable[str]) -> None:
        with self._lock:
            wanted = set(keys)
            if EVERY_JOB in wanted:
                waiters = [w for ws in book.values() for w in ws]
            else:
                waiters = [w for key in wanted for w in book.get(key, ())]
        for wake in waiters:
            wake()

    def everything(self) -> None:
        """Notifications may have been lost (the listener reconnected): every waiter looks."""
        self.new_jobs()
        self.new_events([EVERY_JOB])
        self.new_tinker_requests()
        self.tinker_answers([EVERY_JOB])

    # ---- waiting ----
    def on_new_jobs(self, wake: Callable[[], None]) -> contextlib.AbstractContextManager[None]:
        """`wake()` is called on every new job while the block runs."""
        return self._registered(self._job_waiters, wake)

    def on_tinker_requests(
        self, wake: Callable[[], None]
    ) -> contextlib.AbstractContextManager[None]:
        """`wake()` is called on every new Tinker request row while the block runs."""
        return self._registered(self._request_waiters, wake)

    @contextmanager
    def _registered(
        self, book: list[Callable[[], None]], wake: Callable[[], None]
    ) -> Iterator[None]:
        with self._lock:
            book.append(wake)
        try:
            yield
        finally:
            with self._lock:
                book.remove(wake)

    @contextmanager
    def watching_events(self, job_id: str) -> Iterator[EventWait]:
        """An asyncio-side wait for the job's new events, registered for the block: clear
        it, read, then `await wait(timeout)`; an event committed meanwhile is not missed."""
        with self._watching(self._event_waiters, job_id) as waiting:
            yield waiting

    @contextmanager
    def watching_answer(self, request_id: str) -> Iterator[EventWait]:
        """The same wait for a Tinker request's answer (`retrieve_future`'s long poll)."""
        with self._watching(self._answer_waiters, request_id) as waiting:
            yield waiting

    @contextmanager
    def _watching(
        self, table: dict[str, list[Callable[[], None]]], key: str
    ) -> Iterator[EventWait]:
        waiting = EventWait(asyncio.get_running_loop())
        with self._lock:
            table[key].append(waiting.wake)
        try:
            yield waiting
        finally:
            with self._lock:
                waiters = table[key]
                waiters.remove(waiting.wake)
                if not waiters:
                    del table[key]


class EventWait:
    """A flag set from any thread and awaited on one event loop (a live stream's)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.flag = asyncio.Event()

    def wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: its stream is gone
            self.loop.call_soon_threadsafe(self.flag.set)

    def clear(self) -> None:
        self.flag.clear()

    async def wait(self, timeout: float) -> bool:
        """Whether a wake-up came before `timeout` (the poll that stays as a fallback)."""
        try:
            await asyncio.wait_for(self.flag.wait(), timeout)
        except TimeoutError:
            return False
        return True


# ---- what the store's writes leave in their session (orchestrator.store) ----
def wake_scheduler(session: Session, job_id: str) -> None:
    """Work for the scheduler in this transaction (a new job; one asked to stop, pause or
    resume): it is woken when the transaction commits. Never for the scheduler's own moves,
    which would wake it again and again."""
    notify(session, JOBS_CHANNEL, job_id)
    session.info.setdefault(_NEW_JOBS, set()).add(job_id)


def events_added(session: Session, job_id: str) -> None:
    """New events of the job in this transaction: its live streams wake when it commits."""
    seen = session.info.setdefault(_EVENTS_OF, set())
    if job_id not in seen:  # one notification per job per transaction
        notify(session, EVENTS_CHANNEL, job_id)
        seen.add(job_id)


def notify(session: Session, channel: str, payload: str) -> None:
    # PostgreSQL delivers it to every listener when (and only if) the transaction commits.
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_notify(channel, payload)))


def say_committed(changes: Changes, session: Session) -> None:
    """After a commit: wake this process's waiters for what the session wrote."""
    new_jobs = session.info.pop(_NEW_JOBS, None)
    events_of = session.info.pop(_EVENTS_OF, None)
    if new_jobs:
        changes.new_jobs()
    if events_of:
        changes.new_events(events_of)


def forget_uncommitted(session: Session) -> None:
    """After a rollback: nothing of it happened."""
    session.info.pop(_NEW_JOBS, None)
    session.info.pop(_EVENTS_OF, None)
