"""JobStore: the only code that writes to the database.

Every job state change is one guarded `UPDATE … WHERE id = :id AND status IN (:sources)`
that must touch exactly one row, and appends its event in the same transaction.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.errors import InvalidTransition, NotFound
from orchestrator.models import FileRow, JobEventRow, JobRow
from orchestrator.states import JobStatus, sources_of

if TYPE_CHECKING:
    from orchestrator.idempotency import Idempotency


class DuplicateIdempotencyKey(Exception):
    """Another request with the same Idempotency-Key committed first."""


def new_id(prefix: str) -> str:
    """Ids sort in creation order (microseconds first), so lists page stably by id."""
    return f"{prefix}-{time.time_ns() // 1000:014x}{secrets.token_hex(5)}"


def now() -> int:
    return int(time.time())


class JobStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)

    # ---- files ----
    def add_file(self, row: FileRow, idempotency: Idempotency | None = None) -> FileRow:
        with self._creating(idempotency) as session:
            session.add(row)
            if idempotency:
                idempotency.record(session, row)
        return row

    def get_file(self, tenant: str, file_id: str, param: str | None = None) -> FileRow:
        with self.sessions() as session:
            row = session.get(FileRow, file_id)
        if row is None or row.tenant != tenant:
            raise NotFound("file", file_id, param)
        return row

    def list_files(self, tenant: str, purpose: str | None = None) -> list[FileRow]:
        query = select(FileRow).where(FileRow.tenant == tenant)
        if purpose:
            query = query.where(FileRow.purpose == purpose)
        with self.sessions() as session:
            return list(session.scalars(query.order_by(FileRow.created_at.desc(), FileRow.id)))

    def delete_file(self, tenant: str, file_id: str) -> FileRow:
        row = self.get_file(tenant, file_id)
        with self.sessions.begin() as session:
            session.execute(delete(FileRow).where(FileRow.id == file_id))
        return row

    # ---- jobs ----
    def add_job(self, row: JobRow, message: str, idempotency: Idempotency | None = None) -> JobRow:
        with self._creating(idempotency) as session:
            session.add(row)
            session.flush()
            session.add(_event(row.id, message, data={"status": row.status}))
            if idempotency:
                idempotency.record(session, row)
        return row

    @contextmanager
    def _creating(self, idempotency: Idempotency | None) -> Iterator[Session]:
        """One transaction for an object and its idempotency record: both or neither."""
        try:
            with self.sessions.begin() as session:
                yield session
        except IntegrityError as exc:
            if idempotency is None:
                raise
            raise DuplicateIdempotencyKey(idempotency.key) from exc

    def get_job(self, tenant: str, job_id: str) -> JobRow:
        with self.sessions() as session:
            row = session.get(JobRow, job_id)
        if row is None or row.tenant != tenant:
            raise NotFound("fine-tuning job", job_id)
        return row

    def job(self, job_id: str) -> JobRow:
        """A job by id alone, for the scheduler (which works across tenants)."""
        with self.sessions() as session:
            row = session.get(JobRow, job_id)
        if row is None:
            raise NotFound("fine-tuning job", job_id)
        return row

    def list_jobs(
        self, tenant: str, after: str | None, limit: int, metadata: dict[str, str] | None = None
    ) -> tuple[list[JobRow], bool]:
        """Newest first; `after` is the id of the last job of the previous page."""
        query = select(JobRow).where(JobRow.tenant == tenant)
        if after:
            anchor = self.get_job(tenant, after)
            query = query.where(
                or_(
                    JobRow.created_at < anchor.created_at,
                    and_(JobRow.created_at == anchor.created_at, JobRow.id < anchor.id),
                )
            )
        query = query.order_by(JobRow.created_at.desc(), JobRow.id.desc())
        if not metadata:
            query = query.limit(limit + 1)
        with self.sessions() as session:
            rows = list(session.scalars(query))
        if metadata:
            rows = [
                r
                for r in rows
                if all((r.user_metadata or {}).get(k) == v for k, v in metadata.items())
            ]
        return rows[:limit], len(rows) > limit

    def count_jobs_by_status(self) -> dict[str, int]:
        query = select(JobRow.status, func.count()).group_by(JobRow.status)
        with self.sessions() as session:
            return {status: int(n) for status, n in session.execute(query)}

    def count_unfinished_jobs(self, tenant: str) -> int:
        unfinished = [s.value for s in JobStatus if not s.is_terminal()]
        query = select(func.count()).where(JobRow.tenant == tenant, JobRow.status.in_(unfinished))
        with self.sessions() as session:
            return int(session.scalar(query) or 0)

    def jobs_with_status(self, statuses: Iterable[JobStatus]) -> list[JobRow]:
        """Oldest first, so the scheduler serves jobs in the order they came."""
        query = (
            select(JobRow)
            .where(JobRow.status.in_([s.value for s in statuses]))
            .order_by(JobRow.created_at, JobRow.id)
        )
        with self.sessions() as session:
            return list(session.scalars(query))

    def transition(
        self,
        job_id: str,
        target: JobStatus,
        message: str,
        *,
        level: str = "info",
        data: dict[str, Any] | None = None,
        expected_attempt: int | None = None,
        **values: Any,
    ) -> JobRow:
        """Moves a job to `target` if the table allows it from the job's current status.

        `expected_attempt` fences a run: a stale run (an older attempt) can never move the job.
        Raises InvalidTransition, changing nothing, when no row matched.
        """
        guard = [JobRow.id == job_id, JobRow.status.in_([s.value for s in sources_of(target)])]
        if expected_attempt is not None:
            guard.append(JobRow.attempt == expected_attempt)
        with self.sessions.begin() as session:
            result = session.execute(
                update(JobRow).where(*guard).values(status=target.value, **values)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                current = session.scalar(select(JobRow.status).where(JobRow.id == job_id))
                raise InvalidTransition(job_id, target.value, current)
            session.add(
                _event(job_id, message, level=level, data={**(data or {}), "status": target.value})
            )
            row = session.get(JobRow, job_id, populate_existing=True)
            assert row is not None
            return row

    def record_run_events(
        self,
        job_id: str,
        attempt: int,
        events: Sequence[dict[str, Any]],
        cursor: int,
        **values: Any,
    ) -> bool:
        """Stores a run's new events and moves the job's cursor from where they started,
        fenced by attempt and by that cursor.

        Returns False (storing nothing) if the job has moved on to another attempt, or if
        another scheduler already stored these events.
        """
        with self.sessions.begin() as session:
            result = session.execute(
                update(JobRow)
                .where(
                    JobRow.id == job_id,
                    JobRow.attempt == attempt,
                    JobRow.event_cursor == cursor - len(events),
                )
                .values(event_cursor=cursor, **values)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return False
            for event in events:
                session.add(
                    _event(
                        job_id,
                        event.get("message", ""),
                        level=event.get("level", "info"),
                        type_="metrics" if event.get("type") == "metrics" else "message",
                        data=event.get("data"),
                    )
                )
        return True

    def list_events(
        self, tenant: str, job_id: str, after: str | None, limit: int
    ) -> tuple[list[JobEventRow], bool]:
        """Newest first, as OpenAI lists them; `after` is the id of the last event seen."""
        self.get_job(tenant, job_id)
        query = select(JobEventRow).where(JobEventRow.job_id == job_id)
        if after:
            with self.sessions() as session:
                anchor = session.scalar(select(JobEventRow.seq).where(JobEventRow.id == after))
            if anchor is None:
                raise NotFound("event", after, "after")
            query = query.where(JobEventRow.seq < anchor)
        query = query.order_by(JobEventRow.seq.desc()).limit(limit + 1)
        with self.sessions() as session:
            rows = list(session.scalars(query))
        return rows[:limit], len(rows) > limit

    def last_metrics(self, job_id: str) -> dict[str, Any] | None:
        query = (
            select(JobEventRow.data)
            .where(JobEventRow.job_id == job_id, JobEventRow.type == "metrics")
            .order_by(JobEventRow.seq.desc())
            .limit(1)
        )
        with self.sessions() as session:
            return session.scalar(query)

    def events_since(self, job_id: str, seq: int) -> list[JobEventRow]:
        """Oldest first, for live streams."""
        query = (
            select(JobEventRow)
            .where(JobEventRow.job_id == job_id, JobEventRow.seq > seq)
            .order_by(JobEventRow.seq)
        )
        with self.sessions() as session:
            return list(session.scalars(query))


def _event(
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type_: str = "message",
    data: dict[str, Any] | None = None,
) -> JobEventRow:
    return JobEventRow(
        id=new_id("ftevent"),
        job_id=job_id,
        created_at=now(),
        level=level,
        type=type_,
        message=message,
        data=data,
    )
