"""Ids, timestamps and event rows, shared by the store's modules."""

from __future__ import annotations

import secrets
import time
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from orchestrator.store.changes import events_added
from orchestrator.tables import JobEventRow, JobRow


def new_id(prefix: str) -> str:
    """Ids sort in creation order (microseconds first), so lists page stably by id."""
    return f"{prefix}-{time.time_ns() // 1000:014x}{secrets.token_hex(5)}"


def now() -> int:
    return int(time.time())


def event_row(
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


def add_events(session: Session, job_id: str, events: list[JobEventRow]) -> None:
    """Appends a job's events numbered after its last one (`job_seq`), under the job's row
    lock: PostgreSQL's FOR UPDATE (already held by a transition's UPDATE), SQLite's one
    writer. Numbers therefore commit in order, and a reader that has seen number n never
    sees a number below n appear later. Each INSERT computes its number itself: on SQLite an
    INSERT takes the write lock before it reads, so no other writer can come between."""
    session.execute(select(JobRow.id).where(JobRow.id == job_id).with_for_update())
    if events:
        events_added(session, job_id)  # its live streams wake on commit
    for event in events:
        following = (
            select(func.coalesce(func.max(JobEventRow.job_seq), 0) + 1)
            .where(JobEventRow.job_id == job_id)
            .scalar_subquery()
        )
        session.execute(
            insert(JobEventRow).values(
                id=event.id,
                job_id=job_id,
                job_seq=following,
                created_at=event.created_at,
                level=event.level,
                type=event.type,
                message=event.message,
                data=event.data,
            )
        )
