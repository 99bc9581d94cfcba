"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, pause, resume, events (paged or live),
adapter."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from api.deps import IdempotencyKeyHeader, Services, ServicesDep, TenantDep, read_in_thread
from api.objects import event_object, job_json, job_object, json_response, versioned_page_json
from api.schemas import (
    ErrorResponse,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCreate,
    FineTuningJobEvent,
    ListPage,
)
from core.checkpoint_index import list_checkpoints
from core.object_keys import ARCHIVE, adapter_key
from orchestrator.errors import Conflict
from orchestrator.idempotency import Idempotency, request_hash
from orchestrator.jobs import (
    NewJob,
    cancel_job,
    create_job,
    fine_tuned_model_name,
    pause_job,
    resume_job,
)
from orchestrator.merges import downloadable_job
from orchestrator.states import JobStatus

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 422, 429)
}
Limit = Annotated[int, Query(ge=1, le=100)]
METADATA_FILTER = re.compile(r"metadata\[(.+)\]")
# A checkpoint's metrics as OpenAI names them (the final one's from the job's last event).
CHECKPOINT_METRICS = (
    "step",
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
)
# A live stream wakes when its job's events commit (orchestrator.store.changes, from any
# process on PostgreSQL); this poll is only the fallback.
LIVE_POLL_SECONDS = 0.5


@router.post("", response_model=FineTuningJob, responses=ERRORS)
def create(
    services: ServicesDep,
    tenant: TenantDep,
    body: FineTuningJobCreate,
    idempotency_key: IdempotencyKeyHeader = None,
) -> FineTuningJob:
    hyperparameters = (
        body.method.hyperparameters
        if body.method and body.method.hyperparameters
        else body.hyperparameters
    )
    beta = getattr(hyperparameters, "beta", None)  # DPO's only
    if body.model in services.catalog.entries:
        # Checked now, not when it trains: a missing folder or a target module the base does
        # not have would otherwise be accepted and fail minutes later.
        services.catalog.check_exists(body.model)
        services.catalog.check_target_modules(body.model, body.lora.target_modules)
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
        method=body.method.type if body.method else "supervised",
        beta=beta,
        lora=body.lora.model_dump(),
        training=training,
        resources=body.resources.model_dump(exclude_none=True),
        packing=body.training.packing,
        from_checkpoint=body.from_checkpoint,
        priority=body.priority,
        max_runtime=body.max_runtime,
        lora_given="lora" in body.model_fields_set,
        integrations=[i.model_dump(exclude_none=True) for i in body.integrations or []],
    )

    if not idempotency_key:
        return job_object(
            create_job(
                services.store,
                services.settings,
                tenant,
                request,
                memory_check=services.memory_check,
            )
        )
    idempotency = Idempotency(
        tenant=tenant,
        endpoint="fine_tuning.jobs.create",
        key=idempotency_key,
        request_hash=request_hash(body.model_dump(mode="json")),
        render=lambda row: job_object(row).model_dump(mode="json"),
    )
    created = services.idempotency.create_once(
        idempotency,
        lambda: create_job(
            services.store,
            services.settings,
            tenant,
            request,
            idempotency,
            memory_check=services.memory_check,
        ),
    )
    return FineTuningJob.model_validate(created)


@router.get("", response_model=ListPage[FineTuningJob], responses=ERRORS)
async def list_jobs(
    request: Request,
    services: ServicesDep,
    tenant: TenantDep,
    after: str | None = None,
    limit: Limit = 20,
) -> Response:
    """Newest first. Filter by metadata as OpenAI does: `?metadata[key]=value`."""
    metadata = {
        match.group(1): value
        for name, value in request.query_params.multi_items()
        if (match := METADATA_FILTER.fullmatch(name))
    }

    def page() -> bytes:
        keys, has_more = services.store.list_job_versions(tenant, after, limit, metadata or None)
        return versioned_page_json(
            keys, has_more, lambda job_id: services.store.get_job_fields(tenant, job_id)
        )

    return json_response(await read_in_thread(services, page))


@router.get("/{job_id}", response_model=FineTuningJob, responses=ERRORS)
async def retrieve(services: ServicesDep, tenant: TenantDep, job_id: str) -> Response:
    def job() -> bytes:
        return job_json(services.store.get_job_fields(tenant, job_id))

    return json_response(await read_in_thread(services, job))


@router.post("/{job_id}/cancel", response_model=FineTuningJob, responses=ERRORS)
def cancel(services: ServicesDep, tenant: TenantDep, job_id: str) -> FineTuningJob:
    return job_object(cancel_job(services.store, tenant, job_id))


def _caller(services: Services, tenant: str, authorization: str | None) -> dict[str, Any]:
    """Who asked, for the job's events: the tenant and the API key's id (not the key)."""
    return {"tenant": tenant, "key": services.keys.key_id_for(authorization)}


@router.post("/{job_id}/pause", response_model=FineTuningJob, responses=ERRORS)
def pause(
    services: ServicesDep,
    tenant: TenantDep,
    job_id: str,
    authorization: Annotated[str | None, Header()] = None,
) -> FineTuningJob:
    """A running job is checkpointed at its next step boundary and its slot freed
    (`pausing`, then `paused`); no attempt is spent. 409 for a job that is not running."""
    by = _caller(services, tenant, authorization)
    return job_object(pause_job(services.store, tenant, job_id, by))


@router.post("/{job_id}/resume", response_model=FineTuningJob, responses=ERRORS)
def resume(
    services: ServicesDep,
    tenant: TenantDep,
    job_id: str,
    authorization: Annotated[str | None, Header()] = None,
) -> FineTuningJob:
    """A paused job is queued again and continues from the step it paused at. 409 for a job
    that is not paused."""
    by = _caller(services, tenant, authorization)
    return job_object(resume_job(services.store, tenant, job_id, by))


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
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> ListPage[FineTuningJobEvent] | StreamingResponse:
    """Newest first, paged; with `stream=true`, every event as server-sent events, oldest
    first, until the job ends. Each carries `id:`; a reconnect with `Last-Event-ID` (or
    `after`) resumes after that event, without replaying what the client has."""
    if stream:
        services.store.get_job(tenant, job_id)
        return StreamingResponse(
            _live_events(services, tenant, job_id, last_event_id or after),
            media_type="text/event-stream",
        )
    rows, has_more = services.store.list_events(tenant, job_id, after, limit)
    return ListPage[FineTuningJobEvent](data=[event_object(r) for r in rows], has_more=has_more)


async def _live_events(
    services: Services, tenant: str, job_id: str, resume_after: str | None = None
) -> AsyncIterator[str]:
    seen = 0
    if resume_after:
        # Event ids are opaque to clients; their order is the job's own event number.
        past = await asyncio.to_thread(services.store.events_since, job_id, 0)
        seen = next((row.job_seq for row in past if row.id == resume_after), 0)
    with services.store.changes.watching_events(job_id) as woken:
        while True:
            woken.clear()  # before reading: an event committed from here on wakes the wait
            # Read the status before the events: a job seen terminal has all its events
            # stored. Store calls block: in a thread, so open streams never stall others.
            job = await asyncio.to_thread(services.store.get_job, tenant, job_id)
            terminal = JobStatus(job.status).is_terminal()
            for row in await asyncio.to_thread(services.store.events_since, job_id, seen):
                seen = row.job_seq
                yield f"id: {row.id}\ndata: {event_object(row).model_dump_json()}\n\n"
            if terminal:
                yield "data: [DONE]\n\n"
                return
            await woken.wait(LIVE_POLL_SECONDS)


@router.get(
    "/{job_id}/adapter",
    responses={
        **ERRORS,
        200: {"content": {"application/gzip": {}}},
        307: {
            "description": "Redirect to a short-lived presigned URL of the archive (S3, "
            "download=redirect)"
        },
    },
    response_class=Response,
)
def adapter(
    services: ServicesDep,
    tenant: TenantDep,
    job_id: str,
    download: Annotated[
        Literal["redirect", "stream"],
        Query(
            description="redirect: on S3, a 307 to a presigned URL (the default; clients that "
            "follow redirects download from S3 directly). stream: the archive through the "
            "API itself, for a browser's fetch() with an Authorization header, which a "
            "cross-origin redirect to S3 fails on CORS."
        ),
    ] = "redirect",
) -> Response:
    """The trained adapter as a .tar.gz of its PEFT folder (adapter_config.json,
    adapter_model.safetensors) and its manifest.json. On S3, by default a redirect to a
    presigned URL valid for 5 minutes; with `?download=stream` (and always from a local
    store) the bytes themselves, streamed through the API in chunks. 404 once its model
    was deleted."""
    job = downloadable_job(services.store, tenant, job_id)
    if job.status != JobStatus.SUCCEEDED.value:
        raise Conflict(f"job {job_id} is {job.status}; its adapter exists once it has succeeded")
    key = adapter_key(job.tenant, job.id, job.attempt, ARCHIVE)  # the attempt that succeeded
    if download == "redirect":
        url = services.objects.presigned_url(key, expires_s=300)
        if url is not None:
            return RedirectResponse(url, status_code=307)
    return StreamingResponse(
        services.objects.iter_chunks(key),  # opened here: a missing archive fails before 200
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{job_id}-adapter.tar.gz"'},
    )


@router.get(
    "/{job_id}/checkpoints",
    response_model=ListPage[FineTuningJobCheckpoint],
    responses=ERRORS,
)
def checkpoints(
    services: ServicesDep,
    tenant: TenantDep,
    job_id: str,
    after: str | None = None,
    limit: Limit = 10,
) -> ListPage[FineTuningJobCheckpoint]:
    """A job's saved adapters, newest first: the final one of a succeeded job, then its
    periodic checkpoints (each one a loadable PEFT adapter in the object store); 404 once
    its model was deleted."""
    job = downloadable_job(services.store, tenant, job_id)
    steps: list[tuple[int, int, dict[str, Any]]] = []
    if job.status == JobStatus.SUCCEEDED.value:
        last = services.store.last_metrics(job.id) or {}
        final_step = int(last.get("step", 0))
        steps.append(
            (
                final_step,
                job.finished_at or job.created_at,
                {
                    **{k: last[k] for k in CHECKPOINT_METRICS if last.get(k) is not None},
                    "step": final_step,
                    "train_loss": last.get("train_loss"),
                },
            )
        )
    steps += [
        (c.step, c.created_at, c.metrics)
        for c in list_checkpoints(services.objects, job.tenant, job.id, job.attempt)
        if c.attempt == job.attempt  # the ids from_checkpoint resolves (orchestrator/jobs.py)
        # An early-stopped job's adapter is its best checkpoint: listed once, as the final.
        and not (steps and c.step == steps[0][0])
    ]
    name = job.fine_tuned_model or fine_tuned_model_name(job)
    found = [
        FineTuningJobCheckpoint(
            id=f"ftckpt-{job.id.removeprefix('ftjob-')}-{step}",
            created_at=created_at,
            fine_tuned_model_checkpoint=f"{name}:ckpt-step-{step}",
            fine_tuning_job_id=job.id,
            step_number=step,
            metrics=metrics,
        )
        for step, created_at, metrics in steps
    ]
    if after:
        ids = [c.id for c in found]
        found = found[ids.index(after) + 1 :] if after in ids else []
    return ListPage[FineTuningJobCheckpoint](data=found[:limit], has_more=len(found) > limit)
