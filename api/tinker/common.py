"""What the Tinker API's handlers share: the caller's tenant from `X-API-Key`, the rows'
store, request bodies, and writing a request as a row."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict

from api.deps import get_tenant
from orchestrator.tinker.store import TinkerStore


async def tinker_tenant(
    request: Request,
    x_api_key: Annotated[str | None, Header(alias="X-API-Key")] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> str:
    """The SDK sends its key in X-API-Key; a Bearer key works too."""
    return await get_tenant(request, f"Bearer {x_api_key}" if x_api_key else authorization)


TenantDep = Annotated[str, Depends(tinker_tenant)]


def tinker_store(request: Request) -> TinkerStore:
    store: TinkerStore | None = getattr(request.app.state, "tinker_store", None)
    if store is None:
        # The jobs store's wake-ups: one per process, which the database listener feeds.
        services = request.app.state.services
        store = TinkerStore(services.store.engine, services.store.changes)
        request.app.state.tinker_store = store
    return store


StoreDep = Annotated[TinkerStore, Depends(tinker_store)]


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


async def write_request(
    store: TinkerStore, tenant: str, model_id: str, seq_id: int, kind: str, payload: dict[str, Any]
) -> dict[str, Any]:
    row = await run_in_threadpool(store.add_live_request, tenant, model_id, seq_id, kind, payload)
    return {"request_id": row.id, "model_id": model_id}
