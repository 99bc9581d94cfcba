"""Merged weights of a job's adapter, or of one of its checkpoints, at a chosen scale.

    GET /v1/fine_tuning/jobs/{id}/merged?scale=0.5                          → 202 | 200
    GET /v1/fine_tuning/jobs/{id}/checkpoints/{checkpoint_id}/merged?scale=0.5
    GET …/merged/files/{name}?scale=0.5   (a local store's files, through the API)

The first request queues the merge (the scheduler runs it on Ray: orchestrator/merges.py);
each later one answers 202 with its status until the files are listed (200).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from api.deps import Services, ServicesDep, TenantDep
from api.routers.jobs import ERRORS
from api.schemas import MergedFile, MergedWeights
from orchestrator.merges import merged_file_key, merged_weights
from orchestrator.store.merges import SUCCEEDED, merge_store

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
PRESIGNED_SECONDS = 3600  # merged shards of a large base take a while to download
Scale = Annotated[
    float,
    Query(
        description="How much of the adapter to merge: 1 as trained, 0 the base, 0.5 half "
        "(W + scale·B·A·alpha/r); between -4 and 4."
    ),
]
RESPONSES = {**ERRORS, 202: {"model": MergedWeights, "description": "queued or running"}}


def _answer(
    request: Request,
    services: Services,
    tenant: str,
    job_id: str,
    scale: float,
    checkpoint_id: str | None,
) -> Response:
    found = merged_weights(
        services.store,
        merge_store(services.store.engine),
        services.objects,
        services.settings,
        tenant,
        job_id,
        scale,
        checkpoint_id,
    )
    files = []
    for item in found.files:
        url = services.objects.presigned_url(item.key, expires_s=PRESIGNED_SECONDS)
        if url is None:  # a local store: the API serves the file itself
            url = str(request.url_for("merged_file", job_id=job_id, name=item.name))
            url += f"?scale={found.scale}"
            if checkpoint_id:
                url += f"&checkpoint={checkpoint_id}"
        files.append(MergedFile(name=item.name, size=item.size, sha256=item.sha256, url=url))
    body = MergedWeights(
        fine_tuning_job_id=found.job_id,
        checkpoint=found.checkpoint,
        scale=float(found.scale),
        status=found.status,  # type: ignore[arg-type]  # queued, running or succeeded
        files=files,
    )
    status = 200 if found.status == SUCCEEDED else 202
    return JSONResponse(body.model_dump(mode="json"), status_code=status)


@router.get("/{job_id}/merged", response_model=MergedWeights, responses=RESPONSES)
def merged(
    request: Request, services: ServicesDep, tenant: TenantDep, job_id: str, scale: Scale = 1.0
) -> Response:
    """The job's adapter merged into its base at `scale`: safetensors shards, config and
    tokenizer that `AutoModelForCausalLM.from_pretrained` loads, each with its size, sha256
    and a download URL. 202 while the merge is queued or running; ask again."""
    return _answer(request, services, tenant, job_id, scale, None)


@router.get(
    "/{job_id}/checkpoints/{checkpoint_id}/merged",
    response_model=MergedWeights,
    responses=RESPONSES,
)
def checkpoint_merged(
    request: Request,
    services: ServicesDep,
    tenant: TenantDep,
    job_id: str,
    checkpoint_id: str,
    scale: Scale = 1.0,
) -> Response:
    """As `…/merged`, for one of the checkpoints `GET …/checkpoints` lists."""
    return _answer(request, services, tenant, job_id, scale, checkpoint_id)


@router.get(
    "/{job_id}/merged/files/{name}",
    name="merged_file",
    responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}}},
    response_class=Response,
)
def merged_file(
    services: ServicesDep,
    tenant: TenantDep,
    job_id: str,
    name: str,
    scale: Scale = 1.0,
    checkpoint: Annotated[str | None, Query(description="A checkpoint id; none: final")] = None,
) -> Response:
    """One file of a finished merge: through the API from a local store, a redirect to a
    presigned URL on S3."""
    key = merged_file_key(services.store, services.objects, tenant, job_id, scale, name, checkpoint)
    url = services.objects.presigned_url(key, expires_s=PRESIGNED_SECONDS)
    if url is not None:
        return RedirectResponse(url, status_code=307)
    return StreamingResponse(
        services.objects.iter_chunks(key),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
