"""Usage per tenant (issue 21): each tenant's tokens trained, prefilled and sampled, and
device-seconds, per UTC day (table `usage`, migration 0016).

Added to in the transaction that stores what was measured, so that a measurement counts
exactly once: a job's metrics events (`JobTransitions.record_run_events`, fenced by the
job's event cursor: a batch sent again is not stored again) and a Tinker request's answer
(`TinkerStore.finish`, counted only as the row leaves pending/sent). The pack host measures
and splits (core.usage); nothing here re-derives a share.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BigInteger, Engine, Float, String, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from core.usage import PREFILLED, SAMPLED, TOKEN_KINDS, TRAINED, utc_day
from orchestrator.errors import InvalidRequest
from orchestrator.tables import Base

MAX_DAYS = 366  # one request's range of days
DEFAULT_DAYS = 30  # without start_date: the 30 days ending with end_date


class UsageRow(Base):
    __tablename__ = "usage"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    day: Mapped[str] = mapped_column(String(10), primary_key=True)  # YYYY-MM-DD, UTC
    tokens_trained: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    tokens_prefilled: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    tokens_sampled: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    device_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")


COLUMNS = {TRAINED: "tokens_trained", PREFILLED: "tokens_prefilled", SAMPLED: "tokens_sampled"}


@dataclass
class Usage:
    """What one measurement adds to a tenant's day."""

    day: str
    tokens: dict[str, int] = field(default_factory=dict)  # kind (core.usage) -> tokens
    device_seconds: float = 0.0

    def is_empty(self) -> bool:
        return not any(self.tokens.values()) and not self.device_seconds


def usage_of_events(events: Iterable[Mapping[str, Any]]) -> list[Usage]:
    """The usage a job's new events carry: each training step's metrics event (its tokens
    and its share of the pack's device-seconds, workers.host.step), in the UTC day it was
    measured. An evaluation's metrics event is no training step and carries none."""
    found = []
    for event in events:
        data = event.get("data") or {}
        if event.get("type") != "metrics" or "device_seconds" not in data:
            continue
        found.append(
            Usage(
                day=utc_day(float(data.get("time") or 0.0)),
                tokens={TRAINED: int(data.get("step_tokens") or 0)},
                device_seconds=float(data["device_seconds"]),
            )
        )
    return found


def usage_of_answer(usage: Mapping[str, Any] | None, at: float) -> Usage | None:
    """A Tinker answer's usage ({"tokens": {kind: n}, "device_seconds": s}), counted at `at`."""
    if not usage:
        return None
    tokens = {k: int(v) for k, v in (usage.get("tokens") or {}).items() if k in COLUMNS}
    return Usage(utc_day(at), tokens, float(usage.get("device_seconds") or 0.0))


def add_usage(session: Session, tenant: str, usages: Iterable[Usage]) -> None:
    """Adds to the tenant's days in the caller's transaction (an upsert: two writers adding
    to the same new day both count)."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    for usage in usages:
        if usage.is_empty():
            continue
        values: dict[str, Any] = {
            COLUMNS[kind]: int(n) for kind, n in usage.tokens.items() if kind in COLUMNS
        }
        values["device_seconds"] = float(usage.device_seconds)
        statement = insert(UsageRow).values(tenant=tenant, day=usage.day, **values)
        session.execute(
            statement.on_conflict_do_update(
                index_elements=["tenant", "day"],
                set_={
                    name: getattr(UsageRow, name) + getattr(statement.excluded, name)
                    for name in values
                },
            )
        )


def date_range(
    start_date: str | None, end_date: str | None, today: dt.date
) -> tuple[dt.date, dt.date]:
    """The days asked for (`YYYY-MM-DD`, UTC, both included); bad input names its field."""
    end = _date(end_date, "end_date") if end_date else today
    start = _date(start_date, "start_date") if start_date else end - dt.timedelta(DEFAULT_DAYS - 1)
    if start > end:
        raise InvalidRequest(f"start_date ({start}) is after end_date ({end})", param="start_date")
    if (end - start).days + 1 > MAX_DAYS:
        raise InvalidRequest(
            f"start_date to end_date spans {(end - start).days + 1} days; at most {MAX_DAYS}",
            param="start_date",
        )
    return start, end


def _date(text: str, param: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text) if len(text) == 10 else _bad(text, param)
    except ValueError:
        return _bad(text, param)


def _bad(text: str, param: str) -> dt.date:
    raise InvalidRequest(f"{param} must be a date as YYYY-MM-DD, not {text!r}", param=param)


class UsageStore:
    def __init__(self, engine: Engine) -> None:
        self.sessions = sessionmaker(engine, expire_on_commit=False)

    def days(self, tenant: str, start: dt.date, end: dt.date) -> list[UsageRow]:
        """The tenant's days with usage from `start` to `end` (both included), oldest first."""
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(UsageRow)
                    .where(
                        UsageRow.tenant == tenant,
                        UsageRow.day >= start.isoformat(),
                        UsageRow.day <= end.isoformat(),
                    )
                    .order_by(UsageRow.day)
                )
            )

    def totals(self) -> dict[str, dict[str, float]]:
        """Every tenant's usage over all days ({tenant: {kind or "device_seconds": n}}):
        what the Prometheus counters show (they only grow)."""
        columns = [*COLUMNS.values(), "device_seconds"]
        with self.sessions() as session:
            rows = session.execute(
                select(
                    UsageRow.tenant, *[func.sum(getattr(UsageRow, c)) for c in columns]
                ).group_by(UsageRow.tenant)
            ).all()
        names = [*TOKEN_KINDS, "device_seconds"]
        return {
            row[0]: {name: float(value or 0) for name, value in zip(names, row[1:], strict=True)}
            for row in rows
        }
