"""/v1/usage: the caller's tenant's usage per UTC day (issue 21), in Tinker's units: tokens
trained, prefilled and sampled, and device-seconds (orchestrator.usage), with the storage
the tenant holds now."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import ServicesDep, TenantDep
from api.schemas import ErrorResponse
from orchestrator.store.merges import merge_store
from orchestrator.usage import UsageStore, date_range

router = APIRouter(prefix="/v1/usage", tags=["usage"])


class UsageDay(BaseModel):
    object: Literal["usage.day"] = "usage.day"
    date: str  # YYYY-MM-DD, UTC
    tokens_trained: int
    tokens_prefilled: int
    tokens_sampled: int
    device_seconds: float


class UsagePage(BaseModel):
    object: Literal["list"] = "list"
    tenant: str
    start_date: str
    end_date: str
    # Now, not per day: uploaded files and merged weights (what LORAFLEET_MAX_STORAGE_BYTES_
    # PER_TENANT limits).
    storage_bytes: int
    data: list[UsageDay]  # the days with any usage, oldest first
    has_more: bool = False


@router.get(
    "",
    response_model=UsagePage,
    responses={code: {"model": ErrorResponse} for code in (400, 401)},
)
def usage(
    services: ServicesDep,
    tenant: TenantDep,
    start_date: str | None = None,
    end_date: str | None = None,
) -> UsagePage:
    """The caller's tenant's days from `start_date` to `end_date` (YYYY-MM-DD, UTC, both
    included; default: the 30 days ending today, at most 366)."""
    start, end = date_range(start_date, end_date, dt.datetime.now(dt.UTC).date())
    rows = UsageStore(services.store.engine).days(tenant, start, end)
    return UsagePage(
        tenant=tenant,
        start_date=start.isoformat(),
        end_date=end.isoformat(),
        storage_bytes=merge_store(services.store.engine).tenant_storage_bytes(tenant),
        data=[
            UsageDay(
                date=row.day,
                tokens_trained=row.tokens_trained,
                tokens_prefilled=row.tokens_prefilled,
                tokens_sampled=row.tokens_sampled,
                device_seconds=row.device_seconds,
            )
            for row in rows
        ],
    )
