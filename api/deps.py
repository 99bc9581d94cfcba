"""Dependencies shared by the routers, as `Annotated` aliases."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import Depends, Header, Request
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from api.front_door import check_open_mode_host
from core.base_catalog import BaseModelCatalog
from core.objectstore import ObjectStore
from orchestrator.api_keys import OPEN_TENANT, ApiKeys
from orchestrator.idempotency import IdempotencyKeys
from orchestrator.settings import Settings
from orchestrator.store import JobStore
from orchestrator.tables import ApiKeyRow, JobRow

T = TypeVar("T")
TENANT_CACHE_SECONDS = 1.0
TENANT_CACHE_ENTRIES = 10_000


class CachedApiKeys(ApiKeys):
    """API keys whose lookups are remembered for a second.

    Looking a key up costs a database round trip per request, as much as the request's own
    work. A revoke through this object forgets everything at once; one made elsewhere (the
    `lorafleet keys revoke` command, another replica) takes effect within a second. The open
    tenant (no key created yet) is never remembered: the first key closes the server at once.
    Headers are kept as hashes, never as keys.
    """

    def __init__(self, engine: Engine, seconds: float = TENANT_CACHE_SECONDS) -> None:
        super().__init__(engine)
        self.seconds = seconds
        self._tenants: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._looking_up: dict[str, asyncio.Future[str]] = {}

    @staticmethod
    def _digest(authorization: str | None) -> str:
        return hashlib.sha256((authorization or "").encode()).hexdigest()

    def cached_tenant(self, authorization: str | None) -> str | None:
        entry = self._tenants.get(self._digest(authorization))
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def tenant_for(self, authorization: str | None) -> str:
        tenant = self.cached_tenant(authorization)
        if tenant is not None:
            return tenant
        tenant = super().tenant_for(authorization)
        if tenant != OPEN_TENANT:
            with self._lock:
                if len(self._tenants) >= TENANT_CACHE_ENTRIES:
                    self._tenants.clear()
                expires = time.monotonic() + self.seconds
                self._tenants[self._digest(authorization)] = (tenant, expires)
        return tenant

    async def tenant_for_request(self, authorization: str | None) -> str:
        """`tenant_for` from the event loop: a remembered key at once, else one lookup in a
        thread shared by every request that waits for the same key. When a busy key's second
        runs out, its concurrent requests (64 at once in bench/api_reads.py) make one database
        round trip, not one each."""
        tenant = self.cached_tenant(authorization)
        if tenant is not None:
            return tenant
        digest = self._digest(authorization)
        lookup = self._looking_up.get(digest)
        if lookup is None:
            lookup = asyncio.ensure_future(run_in_threadpool(self.tenant_for, authorization))
            self._looking_up[digest] = lookup
            lookup.add_done_callback(lambda _: self._looking_up.pop(digest, None))
        # Shielded: a client that goes away does not cancel the lookup the others wait for.
        return await asyncio.shield(lookup)

    def revoke(self, key_or_id: str) -> ApiKeyRow:
        row = super().revoke(key_or_id)
        with self._lock:
            self._tenants.clear()
        return row


def db_readers_for(engine: Engine) -> int:
    """Threads that run the hot read routes' queries at once.

    SQLite reads in-process from the page cache: its reads never wait on I/O, so a second
    reader thread overlaps nothing and only takes the GIL back and forth with the first
    (sqlite3 lets it go on every row). Measured with bench/api_reads.py: four readers cost ~50
    context switches per list request against ~7 with one, and list ran at 0.55x the bare
    route against 0.7-0.8x. PostgreSQL reads wait on the network, which threads do overlap;
    more than 4 only queue on the GIL and overflow the connection pool.
    """
    return 1 if engine.dialect.name == "sqlite" else 4


@dataclass
class Services:
    settings: Settings
    store: JobStore
    objects: ObjectStore
    keys: CachedApiKeys
    idempotency: IdempotencyKeys
    catalog: BaseModelCatalog
    db_readers: CapacityLimiter  # db_readers_for(engine) threads
    # Refuses a job no host could ever hold (orchestrator.scheduling.sizing); None: no check.
    memory_check: Callable[[JobRow], None] | None = None


async def read_in_thread(services: Services, read: Callable[[], T]) -> T:
    """Runs a blocking database read off the event loop, `db_readers` at a time."""
    return await anyio.to_thread.run_sync(read, limiter=services.db_readers)


async def get_services(request: Request) -> Services:
    # async: a plain lookup, not worth a hop to the thread pool.
    services: Services = request.app.state.services
    return services


async def get_tenant(
    request: Request,
    authorization: Annotated[str | None, Header(description="Bearer <API key>")] = None,
) -> str:
    """Every lookup is scoped by the caller's tenant, taken from its API key; each key's
    requests are rate limited, and open mode serves loopback Host names only
    (api/front_door.py)."""
    services: Services = request.app.state.services
    request.app.state.rate_limiter.take(CachedApiKeys._digest(authorization))
    tenant = await services.keys.tenant_for_request(authorization)
    if tenant == OPEN_TENANT and not await run_in_threadpool(services.keys.any_exist):
        check_open_mode_host(request.headers.get("host"), tuple(services.settings.open_mode_hosts))
    return tenant


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
