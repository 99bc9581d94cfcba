"""The FastAPI application: routers, error envelope, and (for `serve`) the scheduler."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from anyio import CapacityLimiter
from fastapi import Depends, FastAPI

from api.deps import CachedApiKeys, Services, db_readers_for
from api.errors import install_error_handlers
from api.front_door import RateLimiter, refuse_nul_characters
from api.request_timing import RequestTiming
from api.routers import (
    completions,
    dashboard,
    files,
    jobs,
    merged,
    metrics,
    models,
    usage,
    webhooks,
)
from api.tinker import router as tinker
from core.base_catalog import BaseModelCatalog, CatalogError
from core.objectstore import open_object_store
from orchestrator.cluster_settings import ClusterSettingsError, refuse_what_other_nodes_cannot_see
from orchestrator.db import make_engine, migrate
from orchestrator.idempotency import IdempotencyKeys
from orchestrator.scheduling.sizing import HostSizing
from orchestrator.settings import Settings
from orchestrator.store import JobStore
from orchestrator.store.listener import listen_for_changes
from orchestrator.webhooks import WebhookDeliverer


class ServeRefused(SystemExit):
    """The server must not start (e.g. a catalog entry has no model folder): exits with the
    message and no traceback, since the operator's configuration, not the code, is wrong."""


def replica_sizing(settings: Settings, store: JobStore, catalog: BaseModelCatalog) -> HostSizing:
    """The memory check at submission in an API replica (no Ray): it knows a budget only from
    LORAFLEET_HOST_MEMORY_BYTES, and otherwise leaves the check to the scheduler (said in the
    log once). With the scheduler in the process, its own sizing (the cluster's nodes from
    its Ray connection) checks submissions instead."""
    return HostSizing(
        settings,
        file_rows=lambda job: store.get_file(job.tenant, job.training_file).examples,
        catalog=catalog,
    )


def create_app(settings: Settings | None = None, *, run_scheduler: bool = False) -> FastAPI:
    """The API; with `run_scheduler`, the scheduler loop runs in the same process.

    Refuses to start (ServeRefused) when a base-model catalog entry has no model folder:
    otherwise every job on it would be accepted and fail only once it trains.
    """
    settings = settings or Settings()
    try:  # on a Ray cluster, nothing only this machine can see
        refuse_what_other_nodes_cannot_see(settings)
    except ClusterSettingsError as exc:
        raise ServeRefused(f"lorafleet: not starting: {exc}") from exc
    catalog = BaseModelCatalog(settings.base_models, settings.object_store_config)
    try:
        catalog.check_all()
    except CatalogError as exc:
        raise ServeRefused(f"lorafleet: not starting: LORAFLEET_BASE_MODELS: {exc}") from exc

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url)
        migrate(engine)
        store = JobStore(engine)
        # PostgreSQL: other processes' new jobs and events wake this one's waiters.
        listener = listen_for_changes(engine, store.changes)
        # Tinker futures hear every answer where the dispatcher runs here or NOTIFY reaches
        # this process: their fallback poll can then be slow (api/tinker/router.py).
        app.state.answers_heard = run_scheduler or listener is not None
        objects = open_object_store(settings.object_store_config)
        app.state.services = Services(
            settings=settings,
            store=store,
            objects=objects,
            keys=CachedApiKeys(engine),
            idempotency=IdempotencyKeys(engine),
            catalog=catalog,
            db_readers=CapacityLimiter(db_readers_for(engine)),
            memory_check=replica_sizing(settings, store, catalog).refuse_if_never_fits,
        )
        scheduler = None
        if run_scheduler:
            # Imported here: an API replica (--no-scheduler) never loads Ray.
            from orchestrator.scheduling.ray_connection import RayConnection
            from orchestrator.scheduling.scheduler import Scheduler

            scheduler = Scheduler(settings, store, objects, RayConnection(settings))
            # Submissions are sized against the cluster the scheduler sees, once it sees one;
            # until then (its first tick, or the SQLite lock it waits for) as a replica's are:
            # asking Ray before the connection failed every submission with a 500.
            on_cluster = scheduler.host_scheduling.sizing.refuse_if_never_fits
            as_replica = app.state.services.memory_check
            connected = scheduler.ray.connected
            app.state.services.memory_check = lambda job: (
                on_cluster(job) if connected() else as_replica(job)
            )
            scheduler.start()
        # Webhooks go out from their own thread wherever a scheduler runs; never from it.
        deliverer = WebhookDeliverer(settings, engine) if run_scheduler else None
        if deliverer is not None:
            deliverer.start()
        try:
            yield
        finally:
            if deliverer is not None:
                deliverer.stop()
            if scheduler is not None:
                scheduler.stop()
            if listener is not None:
                listener.stop()
            engine.dispose()

    app = FastAPI(
        title="lorafleet",
        version="0.1.0",
        description="LoRA fine-tuning jobs over an OpenAI-compatible API, trained on Ray "
        "with DeepSpeed ZeRO-3; adapters in PEFT format.",
        lifespan=lifespan,
        dependencies=[Depends(refuse_nul_characters)],
    )
    install_error_handlers(app)
    # Per API key, in this process (each replica limits what reaches it).
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
    app.include_router(files.router)
    app.include_router(jobs.router)
    app.include_router(merged.router)
    app.include_router(models.router)
    app.include_router(metrics.router)
    app.include_router(webhooks.router)
    app.include_router(dashboard.router)
    app.include_router(tinker.router)  # the Tinker training API, /api/v1 (issue 21)
    app.include_router(completions.router)  # sampling a model (issue 21)
    app.include_router(usage.router)  # usage per tenant (issue 21)
    app.add_middleware(RequestTiming)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
