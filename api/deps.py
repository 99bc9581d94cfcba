"""Dependencies shared by the routers, as `Annotated` aliases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from core.base_catalog import BaseModelCatalog
from core.objectstore import ObjectStore
from orchestrator.api_keys import ApiKeys
from orchestrator.idempotency import IdempotencyKeys
from orchestrator.settings import Settings
from orchestrator.store import JobStore


@dataclass
class Services:
    settings: Settings
    store: JobStore
    objects: ObjectStore
    keys: ApiKeys
    idempotency: IdempotencyKeys
    catalog: BaseModelCatalog


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def get_tenant(
    request: Request,
    authorization: Annotated[str | None, Header(description="Bearer <API key>")] = None,
) -> str:
    """Every lookup is scoped by the caller's tenant, taken from its API key."""
    return get_services(request).keys.tenant_for(authorization)


ServicesDep = Annotated[Services, Depends(get_services)]
TenantDep = Annotated[str, Depends(get_tenant)]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=256,
        description="A retry with the same key and body returns the first response.",
    ),
]
