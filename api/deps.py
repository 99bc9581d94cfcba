"""Dependencies shared by the routers, as `Annotated` aliases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from orchestrator.settings import Settings
from orchestrator.store import JobStore
from workers.objectstore import ObjectStore

DEFAULT_TENANT = "default"


@dataclass
class Services:
    settings: Settings
    store: JobStore
    objects: ObjectStore


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def get_tenant() -> str:
    # One tenant until API keys exist; every lookup is already scoped by it.
    return DEFAULT_TENANT


ServicesDep = Annotated[Services, Depends(get_services)]
TenantDep = Annotated[str, Depends(get_tenant)]
