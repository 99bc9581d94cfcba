"""JobStore: the one package that writes to the database (jobs, their events, files, API
keys and idempotency records; webhook endpoints and deliveries in `store/webhooks.py`);
other modules only read.

Every job state change is a named operation (`store/transitions.py`): one guarded
`UPDATE … WHERE id = :id AND status IN (:sources)` that must touch exactly one row, and
appends its event in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, Select, delete, event, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.errors import NotFound, RateLimited
from orchestrator.states import JobStatus
from orchestrator.store.changes import (
    Changes,
    forget_uncommitted,
    say_committed,
    wake_scheduler,
)
from orchestrator.store.job_reads import JobFields, JobReads
from orchestrator.store.rows import add_events, new_id, now
from orchestrator.store.rows import event_row as _event
from orchestrator.store.transitions import JobTransitions
from orchestrator.tables import ApiKeyRow, FileRow, IdempotencyRow, JobEventRow, JobRow

if TYPE_CHECKING:
    from orchestrator.idempotency import Idempotency

__all__ = ["DuplicateIdempotencyKey", "JobFields", "JobStore", "new_id", "now"]


class DuplicateIdempotencyKey(Exception):
    """Another request with the same Idempotency-Key committed first."""


class JobStore(JobTransitions):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        # New jobs and events wake this process's waiters as they commit (store/changes.py).
        self.changes = Changes()
        event.listen(self.sessions, "after_commit", lambda s: say_committed(self.changes, s))
        event.listen(self.sessions, "after_rollback", forget_uncommitted)

    # ---- files ----
    def add_file(self, row: FileRow, idempotency: Idempotency | None = None) -> FileRow:
        with self._creating(idempotency) as session:
            session.add(row)
            if idempotency:
                _record(session, idempotency, row)
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
    def add_job(
        self,
        row: JobRow,
        message: str,
        idempotency: Idempotency | None = None,
        max_unfinished: int | None = None,
    ) -> JobRow:
        """Adds the job and its first event; with `max_unfinished`, only if its tenant then
        has no more unfinished jobs than that (RateLimited otherwise, nothing stored).

        The quota is checked and taken in this one transaction, under a lock per tenant:
        PostgreSQL's advisory lock on the tenant, held to commit; on SQLite the INSERT comes
        first and takes the one write lock, so the count after it sees every other writer's
        job. Concurrent creates can therefore never pass the quota together."""
        with self._creating(idempotency) as session:
            if max_unfinished is not None and session.get_bind().dialect.name == "postgresql":
                session.execute(select(func.pg_advisory_xact_lock(func.hashtext(row.tenant))))
            session.add(row)
            session.flush()
            if max_unfinished is not None:
                taken = session.scalar(_unfinished_of(row.tenant)) or 0
                if taken > max_unfinished:
                    raise RateLimited(
                        f"tenant {row.tenant!r} already has {max_unfinished} unfinished jobs "
                        "(the limit); wait for some to finish or cancel them"
                    )
            add_events(session, row.id, [_event(row.id, message, data={"status": row.status})])
            wake_scheduler(session, row.id)  # NOTIFY on PostgreSQL
            if idempotency:
                _record(session, idempotency, row)
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

    def get_job_fields(self, tenant: str, job_id: str) -> JobFields:
        """The job as plain columns (JobFields), for reading only."""
        return self.reads.job(tenant, job_id)

    @cached_property
    def reads(self) -> JobReads:
        """The API's hot reads, compiled for this engine on first use."""
        return JobReads(self.engine)

    def job(self, job_id: str) -> JobRow:
        """A job by id alone, for the scheduler (which works across tenants)."""
        with self.sessions() as session:
            row = session.get(JobRow, job_id)
        if row is None:
            raise NotFound("fine-tuning job", job_id)
        return row

    def list_jobs(
        self, tenant: str, after: str | None, limit: int, metadata: dict[str, str] | None = None
    ) -> tuple[list[JobFields], bool]:
        """Newest first, as plain columns; `after` is the id of the last job of the previous
        page; `metadata` keeps the jobs with all these metadata values (filtered in SQL)."""
        return self.reads.page(tenant, after, limit, metadata)

    def list_job_versions(
        self, tenant: str, after: str | None, limit: int, metadata: dict[str, str] | None = None
    ) -> tuple[list[tuple[str, int]], bool]:
        """The same page as `list_jobs`, as (id, version) pairs: a job's version changes
        with every write to its row (a trigger raises it), so a body rendered for one pair
        is that job's body for as long as the pair is what the page reads."""
        return self.reads.page_versions(tenant, after, limit, metadata)

    def fine_tuned_models(self, tenant: str) -> list[JobRow]:
        """The tenant's succeeded jobs that named a fine-tuned model, oldest first."""
        query = (
            select(JobRow)
            .where(
                JobRow.tenant == tenant,
                JobRow.status == JobStatus.SUCCEEDED.value,
                JobRow.fine_tuned_model.is_not(None),
                JobRow.model_deleted_at.is_(None),
            )
            .order_by(JobRow.created_at, JobRow.id)
        )
        with self.sessions() as session:
            return list(session.scalars(query))

    def model_job(self, tenant: str, model_id: str) -> JobRow | None:
        """The tenant's succeeded job whose fine-tuned model is `model_id` (deleted or not)."""
        query = select(JobRow).where(
            JobRow.tenant == tenant,
            JobRow.status == JobStatus.SUCCEEDED.value,
            JobRow.fine_tuned_model == model_id,
        )
        with self.sessions() as session:
            return session.scalar(query.limit(1))

    def mark_model_deleted(self, job_id: str) -> JobRow:
        """The job stays; its model is marked deleted once (guarded), with an event."""
        with self.sessions.begin() as session:
            result = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.model_deleted_at.is_(None))
                .values(model_deleted_at=now())
            )
            if result.rowcount:  # type: ignore[attr-defined]
                message = (
                    "Fine-tuned model deleted: its adapter, checkpoints and merged weights "
                    "were removed from the store"
                )
                add_events(session, job_id, [_event(job_id, message)])
        return self.job(job_id)

    def count_jobs_by_status(self) -> dict[str, int]:
        query = select(JobRow.status, func.count()).group_by(JobRow.status)
        with self.sessions() as session:
            return {status: int(n) for status, n in session.execute(query)}

    def count_unfinished_jobs(self, tenant: str) -> int:
        with self.sessions() as session:
            return int(session.scalar(_unfinished_of(tenant)) or 0)

    def jobs_with_status(self, statuses: Iterable[JobStatus]) -> list[JobRow]:
        """Oldest first, so the scheduler serves jobs in the order they came."""
        query = (
            select(JobRow)
            .where(JobRow.status.in_([s.value for s in statuses]))
            .order_by(JobRow.created_at, JobRow.id)
        )
        with self.sessions() as session:
            return list(session.scalars(query))

    def list_events(
        self, tenant: str, job_id: str, after: str | None, limit: int
    ) -> tuple[list[JobEventRow], bool]:
        """Newest first, as OpenAI lists them; `after` is the id of the last event seen."""
        self.get_job(tenant, job_id)
        query = select(JobEventRow).where(JobEventRow.job_id == job_id)
        if after:
            with self.sessions() as session:
                anchor = session.scalar(
                    select(JobEventRow.job_seq).where(
                        JobEventRow.id == after, JobEventRow.job_id == job_id
                    )
                )
            if anchor is None:
                raise NotFound("event", after, "after")
            query = query.where(JobEventRow.job_seq < anchor)
        query = query.order_by(JobEventRow.job_seq.desc()).limit(limit + 1)
        with self.sessions() as session:
            rows = list(session.scalars(query))
        return rows[:limit], len(rows) > limit

    def last_metrics(self, job_id: str) -> dict[str, Any] | None:
        query = (
            select(JobEventRow.data)
            .where(JobEventRow.job_id == job_id, JobEventRow.type == "metrics")
            .order_by(JobEventRow.job_seq.desc())
            .limit(1)
        )
        with self.sessions() as session:
            return session.scalar(query)

    def events_since(self, job_id: str, seq: int) -> list[JobEventRow]:
        """Oldest first, for live streams: the job's events numbered above `seq` (job_seq,
        which commits in order, so a stream that asks again from its last never skips one)."""
        query = (
            select(JobEventRow)
            .where(JobEventRow.job_id == job_id, JobEventRow.job_seq > seq)
            .order_by(JobEventRow.job_seq)
        )
        with self.sessions() as session:
            return list(session.scalars(query))

    # ---- API keys (the rules, hashing and lookups, are in orchestrator/api_keys.py) ----
    def add_api_key(self, row: ApiKeyRow) -> ApiKeyRow:
        with self.sessions.begin() as session:
            session.add(row)
        return row

    def revoke_api_key(self, key_or_id: str, key_hash: str) -> ApiKeyRow:
        """Revokes the key whose id is `key_or_id`, or whose hash is `key_hash`."""
        match = or_(ApiKeyRow.id == key_or_id, ApiKeyRow.key_hash == key_hash)
        with self.sessions.begin() as session:
            row = session.scalar(select(ApiKeyRow).where(match))
            if row is None:
                raise NotFound("API key", key_or_id)
            session.execute(
                update(ApiKeyRow).where(ApiKeyRow.id == row.id).values(revoked_at=now())
            )
        return row


def _unfinished_of(tenant: str) -> Select[int]:
    unfinished = [s.value for s in JobStatus if not s.is_terminal()]
    return select(func.count()).where(JobRow.tenant == tenant, JobRow.status.in_(unfinished))


def _record(session: Session, idempotency: Idempotency, created: Any) -> None:
    """Adds the key's first response to the transaction that creates `created`."""
    session.add(
        IdempotencyRow(
            tenant=idempotency.tenant,
            endpoint=idempotency.endpoint,
            key=idempotency.key,
            request_hash=idempotency.request_hash,
            response=idempotency.render(created),
            created_at=now(),
        )
    )
