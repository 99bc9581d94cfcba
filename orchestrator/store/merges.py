"""Merged-weights requests in the database (part of the store, the one DB writer).

One row per (job, checkpoint, scale), created by the first request for it: `queued` →
`running` (claimed by one scheduler with a guarded update) → `succeeded` | `failed`. The
scheduler running a merge raises its `heartbeat_at` every tick; a row whose heartbeat is
old (its scheduler went away) is queued again by any scheduler. A finished merge's bytes
count in its tenant's storage.
"""

from __future__ import annotations

import time
from functools import lru_cache

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from orchestrator.store.rows import new_id, now
from orchestrator.tables import FileRow, MergeRow

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"


class MergeStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)

    def get(self, job_id: str, checkpoint: str, scale: str) -> MergeRow | None:
        query = select(MergeRow).where(
            MergeRow.job_id == job_id, MergeRow.checkpoint == checkpoint, MergeRow.scale == scale
        )
        with self.sessions() as session:
            return session.scalar(query)

    def by_id(self, merge_id: str) -> MergeRow | None:
        with self.sessions() as session:
            return session.get(MergeRow, merge_id)

    def request(self, tenant: str, job_id: str, checkpoint: str, scale: str) -> MergeRow:
        """The merge for these, created `queued` by the first request (two at once: one
        insert wins, the other reads it)."""
        found = self.get(job_id, checkpoint, scale)
        if found is not None:
            return found
        row = MergeRow(
            id=new_id("merge"),
            tenant=tenant,
            job_id=job_id,
            checkpoint=checkpoint,
            scale=scale,
            status=QUEUED,
            bytes=0,
            created_at=now(),
        )
        try:
            with self.sessions.begin() as session:
                session.add(row)
        except IntegrityError:
            found = self.get(job_id, checkpoint, scale)
            if found is None:
                raise
            return found
        return row

    def retry(self, merge_id: str) -> bool:
        """A failed merge asked for again goes back to the queue."""
        return self._move(merge_id, (FAILED,), status=QUEUED, error=None)

    def queued(self, limit: int) -> list[MergeRow]:
        query = (
            select(MergeRow)
            .where(MergeRow.status == QUEUED)
            .order_by(MergeRow.created_at, MergeRow.id)
            .limit(limit)
        )
        with self.sessions() as session:
            return list(session.scalars(query))

    def count_running(self) -> int:
        with self.sessions() as session:
            return int(session.scalar(select(func.count()).where(MergeRow.status == RUNNING)) or 0)

    def claim(self, merge_id: str) -> bool:
        return self._move(
            merge_id, (QUEUED,), status=RUNNING, started_at=now(), heartbeat_at=time.time()
        )

    def heartbeat(self, merge_ids: list[str]) -> None:
        if merge_ids:
            with self.sessions.begin() as session:
                session.execute(
                    update(MergeRow)
                    .where(MergeRow.id.in_(merge_ids), MergeRow.status == RUNNING)
                    .values(heartbeat_at=time.time())
                )

    def requeue_stale(self, older_than_s: float, keep: set[str]) -> int:
        """Running merges nobody has heartbeaten for `older_than_s` (but those in `keep`,
        this scheduler's own) go back to the queue; returns how many."""
        cutoff = time.time() - older_than_s
        query = update(MergeRow).where(
            MergeRow.status == RUNNING,
            MergeRow.heartbeat_at < cutoff,
            MergeRow.id.not_in(keep or {""}),
        )
        with self.sessions.begin() as session:
            result = session.execute(query.values(status=QUEUED))
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def finish(self, merge_id: str, stored_bytes: int) -> bool:
        return self._move(
            merge_id, (RUNNING,), status=SUCCEEDED, bytes=stored_bytes, finished_at=now()
        )

    def fail(self, merge_id: str, error: str) -> bool:
        return self._move(merge_id, (RUNNING,), status=FAILED, error=error, finished_at=now())

    def delete_for_job(self, job_id: str) -> None:
        with self.sessions.begin() as session:
            session.execute(delete(MergeRow).where(MergeRow.job_id == job_id))

    def tenant_storage_bytes(self, tenant: str) -> int:
        """What the tenant keeps in the store that it asked for: uploaded files and merged
        weights (adapters and checkpoints are the training's own, bounded per job)."""
        with self.sessions() as session:
            files = session.scalar(
                select(func.coalesce(func.sum(FileRow.bytes), 0)).where(FileRow.tenant == tenant)
            )
            merged = session.scalar(
                select(func.coalesce(func.sum(MergeRow.bytes), 0)).where(
                    MergeRow.tenant == tenant, MergeRow.status == SUCCEEDED
                )
            )
        return int(files or 0) + int(merged or 0)

    def _move(self, merge_id: str, sources: tuple[str, ...], **values: object) -> bool:
        """One guarded update: whether the row was in one of `sources` (and moved)."""
        query = (
            update(MergeRow)
            .where(MergeRow.id == merge_id, MergeRow.status.in_(sources))
            .values(**values)
        )
        with self.sessions.begin() as session:
            result = session.execute(query)
            return bool(result.rowcount)  # type: ignore[attr-defined]


@lru_cache(maxsize=8)
def merge_store(engine: Engine) -> MergeStore:
    """One MergeStore per engine (the API builds it from its JobStore's engine)."""
    return MergeStore(engine)
