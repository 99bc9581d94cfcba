"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, events (paged or live), adapter."""

from __future__ import annotations

import asyncio
import io
import tarfile
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse

from api.deps import Services, ServicesDep, TenantDep
from api.objects import event_object, job_object
from api.schemas import (
    ErrorResponse,
    FineTuningJob,
    FineTuningJobCreate,
    FineTuningJobEvent,
    ListPage,
)
from orchestrator.errors import Conflict
from orchestrator.jobs import NewJob, cancel_job, create_job
from orchestrator.states import JobStatus
from workers.layout import ADAPTER_FILES, MANIFEST, adapter_key

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    409: {"model": ErrorResponse},
}
Limit = Annotated[int, Query(ge=1, le=100)]
LIVE_POLL_SECONDS = 0.5


@router.post("", response_model=FineTuningJob, responses=ERRORS)
def create(services: ServicesDep, tenant: TenantDep, body: FineTuningJobCreate) -> FineTuningJob:
    hyperparameters = (
        body.method.supervised.hyperparameters
        if body.method and body.method.supervised and body.method.supervised.hyperparameters
        else body.hyperparameters
    )
    training = body.training.model_dump(exclude_none=True, exclude={"packing"})
    request = NewJob(
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        suffix=body.suffix,
        seed=body.seed,
        metadata=body.metadata,
        n_epochs=hyperparameters.n_epochs if hyperparameters else None,
        batch_size=hyperparameters.batch_size if hyperparameters else None,
        learning_rate_multiplier=hyperparameters.learning_rate_multiplier
        if hyperparameters
        else None,
        lora=body.lora.model_dump(),
        training=training,
        resources=body.resources.model_dump(exclude_none=True),
        packing=body.training.packing,
    )
    return job_object(create_job(services.store, services.settings, tenant, request))


@router.get("", response_model=ListPage[FineTuningJob], responses=ERRORS)
def list_jobs(
    services: ServicesDep,
    tenant: TenantDep,
    after: str | None = None,
    limit: Limit = 20,
) -> ListPage[FineTuningJob]:
    rows, has_more = services.store.list_jobs(tenant, after, limit)
    return ListPage[FineTuningJob](data=[job_object(r) for r in rows], has_more=has_more)


@router.get("/{job_id}", response_model=FineTuningJob, responses=ERRORS)
def retrieve(services: ServicesDep, tenant: TenantDep, job_id: str) -> FineTuningJob:
    return job_object(services.store.get_job(tenant, job_id))


@router.post("/{job_id}/cancel", response_model=FineTuningJob, responses=ERRORS)
def cancel(services: ServicesDep, tenant: TenantDep, job_id: str) -> FineTuningJob:
    return job_object(cancel_job(services.store, tenant, job_id))


@router.get(
    "/{job_id}/events",
    response_model=ListPage[FineTuningJobEvent],
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}},
)
def events(
    services: ServicesDep,
    tenant: TenantDep,
    job_id: str,
    after: str | None = None,
    limit: Limit = 20,
    stream: bool = False,
) -> ListPage[FineTuningJobEvent] | StreamingResponse:
    """Newest first, paged; with `stream=true`, every event as server-sent events, oldest
    first, until the job ends."""
    if stream:
        services.store.get_job(tenant, job_id)
        return StreamingResponse(
            _live_events(services, tenant, job_id), media_type="text/event-stream"
        )
    rows, has_more = services.store.list_events(tenant, job_id, after, limit)
    return ListPage[FineTuningJobEvent](data=[event_object(r) for r in rows], has_more=has_more)


async def _live_events(services: Services, tenant: str, job_id: str) -> AsyncIterator[str]:
    seen = 0
    while True:
        # Read the status before the events: a job seen terminal has all its events stored.
        terminal = JobStatus(services.store.get_job(tenant, job_id).status).is_terminal()
        for row in await asyncio.to_thread(services.store.events_since, job_id, seen):
            seen = row.seq
            yield f"data: {event_object(row).model_dump_json()}\n\n"
        if terminal:
            yield "data: [DONE]\n\n"
            return
        await asyncio.sleep(LIVE_POLL_SECONDS)


@router.get(
    "/{job_id}/adapter",
    responses={**ERRORS, 200: {"content": {"application/gzip": {}}}},
    response_class=Response,
)
def adapter(services: ServicesDep, tenant: TenantDep, job_id: str) -> Response:
    """The trained adapter as a .tar.gz of its PEFT folder (adapter_config.json,
    adapter_model.safetensors) and its manifest.json."""
    job = services.store.get_job(tenant, job_id)
    if job.status != JobStatus.SUCCEEDED.value:
        raise Conflict(f"job {job_id} is {job.status}; its adapter exists once it has succeeded")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name in (*ADAPTER_FILES, MANIFEST):
            data = services.objects.get_bytes(adapter_key(job.tenant, job.id, name))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = job.finished_at or 0
            tar.addfile(info, io.BytesIO(data))
    return Response(
        archive.getvalue(),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{job_id}-adapter.tar.gz"'},
    )
