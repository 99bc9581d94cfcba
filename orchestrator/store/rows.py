"""Ids, timestamps and event rows, shared by the store's modules."""

from __future__ import annotations

import secrets
import time
from typing import Any

from orchestrator.tables import JobEventRow


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
