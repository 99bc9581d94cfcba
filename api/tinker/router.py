"""The Tinker training API under /api/v1 (issue 21), as the official `tinker` SDK calls it.

Thin handlers: each training request is written as a row (orchestrator.tinker.store) and
answered with a future, `{"request_id", "model_id"}`; the scheduler's Tinker dispatcher
runs it on the model's pack host; `retrieve_future` long-polls the row, woken as its
answer commits (orchestrator.store.changes). Keys come in
`X-API-Key` (the SDK wants the `tml-` prefix, which every key made here has) and map to
tenants as the jobs API's do. Errors are 4xx with a body naming the field: the SDK retries
5xx, 408, 409, 429 and empty 400s for minutes, which would look like a hang.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import Field

from api.deps import ServicesDep
from api.errors import error_response
from api.tinker import sampling, weights
from api.tinker.common import Body, StoreDep, TenantDep, write_request
from api.tinker.sampling import encode_sample_response
from api.tinker.wire import (
    PROTO_CONTENT_TYPE,
    WireError,
    decode_forward_backward,
    encode_forward_backward_output,
)
from core.base_catalog import BaseModelCatalog
from orchestrator.errors import InvalidRequest
from orchestrator.tinker.rows import DONE, FAILED, SAMPLE, TinkerRequestRow
from orchestrator.tinker.store import SessionEnded

router = APIRouter(prefix="/api/v1", tags=["tinker"])

LONG_POLL_SECONDS = 25.0  # under the SDK's 45 s timeout of one retrieve_future call
# A future is woken when its answer commits; its poll is the fallback for a wake-up that
# never comes: an API beside a scheduler on the same SQLite file hears none; where this
# process hears every answer (its own dispatcher, or PostgreSQL NOTIFY) a poll only costs
# CPU (16 futures in flight read 160 rows a second at 0.1 s).
POLL_INTERVAL_SECONDS, HEARD_POLL_INTERVAL_SECONDS = 0.1, 2.0
MAX_RANK = 256


class LoraConfig(Body):
    rank: int = Field(ge=1, le=MAX_RANK)
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModel(Body):
    session_id: str
    model_seq_id: int = Field(ge=0)
    base_model: str
    lora_config: LoraConfig | None = None
    optimizer_config: dict[str, Any] | None = None


class ModelRef(Body):
    model_id: str


class AdamParams(Body):
    learning_rate: float = Field(default=1e-4, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-12, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip_norm: float = Field(default=0.0, ge=0)


class OptimStep(Body):
    model_id: str
    seq_id: int = Field(ge=1)
    adam_params: AdamParams | None = None
    optimizer_params: dict[str, Any] | None = None


class SessionRef(Body):
    session_id: str


class FutureRef(Body):
    request_id: str
    allow_metadata_only: bool = False


# ---- configuration and capabilities -------------------------------------------------------
@router.post("/client/config")
async def client_config(_: TenantDep) -> dict[str, Any]:
    # Plain API keys, uncompressed protobuf bodies, httpx's own transport.
    return {
        "pjwt_auth_enabled": False,
        "credential_default_source": "api_key",
        "proto_compress_fwdbwd": False,
        "use_pyqwest_transport": False,
    }


@router.post("/client/dynamic_config")
async def client_dynamic_config(_: TenantDep) -> dict[str, Any]:
    return {}


@router.post("/telemetry")
async def telemetry(_: TenantDep) -> dict[str, str]:
    # The SDK reports its own errors and timings here; lorafleet keeps none of it.
    return {"status": "accepted"}


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/get_server_capabilities")
async def capabilities(_: TenantDep, services: ServicesDep) -> dict[str, Any]:
    names = sorted(services.settings.base_models)
    return {
        "supported_models": [
            {"model_name": name, "trainable": True, "sampleable": True} for name in names
        ]
    }


# ---- sessions -------------------------------------------------------------------------------
@router.post("/create_session")
async def create_session(tenant: TenantDep, store: StoreDep) -> dict[str, Any]:
    session_id = await run_in_threadpool(store.create_session, tenant)
    return {"type": "create_session", "session_id": session_id}


@router.post("/session_heartbeat", response_model=None)
async def session_heartbeat(
    body: SessionRef, tenant: TenantDep, store: StoreDep
) -> dict[str, Any] | JSONResponse:
    try:
        await run_in_threadpool(store.heartbeat, tenant, body.session_id)
    except SessionEnded as exc:  # 410: the SDK stops its heartbeat loop
        return error_response(410, str(exc), "session_id", "session_ended")
    return {"type": "session_heartbeat"}


class FinishSession(Body):
    reason: dict[str, Any] | None = None
    detail: str | None = None


@router.post("/sessions/{session_id}/finish")
async def finish_session(
    session_id: str, body: FinishSession, tenant: TenantDep, store: StoreDep
) -> dict[str, Any]:
    """The client closed its session: its models' slots are freed."""
    reason = str((body.reason or {}).get("type") or "finished")
    await run_in_threadpool(store.finish_session, tenant, session_id, f"finished: {reason}")
    return {}


# ---- models -------------------------------------------------------------------------------
@router.post("/create_model")
async def create_model(
    body: CreateModel, tenant: TenantDep, store: StoreDep, services: ServicesDep
) -> dict[str, Any]:
    if body.base_model not in services.settings.base_models:
        known = ", ".join(sorted(services.settings.base_models)) or "none"
        raise InvalidRequest(
            f"base_model: {body.base_model!r} is not served here (served: {known})",
            "base_model",
        )
    if services.settings.warm_hosts < 1:
        raise InvalidRequest(
            "base_model: Tinker models train on warm pack hosts and this server keeps none: "
            "set LORAFLEET_WARM_HOSTS=1 (or more)",
            "base_model",
        )
    if body.lora_config is None:
        raise InvalidRequest("lora_config: only LoRA models are trained here", "lora_config")
    optimizer = (body.optimizer_config or {}).get("type", "adamw")
    if optimizer != "adamw":
        raise InvalidRequest(
            f"optimizer_config.type: {optimizer!r} is not supported (adamw only)",
            "optimizer_config.type",
        )
    lora = body.lora_config
    if not (lora.train_mlp or lora.train_attn or lora.train_unembed):
        raise InvalidRequest(
            "lora_config: one of train_mlp, train_attn and train_unembed must be true",
            "lora_config.train_mlp",
        )
    try:
        row = await run_in_threadpool(
            store.create_model,
            tenant,
            body.session_id,
            body.model_seq_id,
            body.base_model,
            body.lora_config.model_dump(),
        )
    except SessionEnded as exc:
        raise InvalidRequest(str(exc), "session_id") from exc
    return {"request_id": row.id, "model_id": row.model_id}


@router.post("/get_info")
async def get_info(
    body: ModelRef, tenant: TenantDep, store: StoreDep, services: ServicesDep
) -> dict[str, Any]:
    model = await run_in_threadpool(store.model, tenant, body.model_id)
    return {
        "type": "get_info",
        "model_id": model.id,
        "model_data": {
            "arch": "lora",
            "model_name": model.base_model,
            "tokenizer_id": tokenizer_id(services.catalog, model.base_model),
        },
        "is_lora": True,
        "lora_rank": model.lora["rank"],
        "model_name": model.base_model,
    }


def tokenizer_id(catalog: BaseModelCatalog, base_model: str) -> str:
    """What the SDK's `get_tokenizer` loads with transformers: the base's folder when it is a
    local one (a client on the same machine loads it as it is), else the catalog name (the
    client must have that name locally: a folder of that path, or its Hugging Face cache)."""
    location = catalog.entries.get(base_model, base_model)
    return base_model if location.startswith("s3://") else location


# ---- training -----------------------------------------------------------------------------
@router.post("/forward_backward")
async def forward_backward(request: Request, tenant: TenantDep, store: StoreDep) -> dict[str, Any]:
    body = await request.body()
    if request.headers.get("content-encoding", "identity") not in ("identity", ""):
        raise InvalidRequest("Content-Encoding: only uncompressed bodies are read", "body")
    try:
        decoded = decode_forward_backward(body)
    except WireError as exc:
        raise InvalidRequest(str(exc), exc.param) from exc
    if decoded["seq_id"] < 1:
        raise InvalidRequest("seq_id: must be at least 1", "seq_id")
    kind = "forward" if decoded.pop("forward_only") else "forward_backward"
    return await write_request(
        store, tenant, decoded.pop("model_id"), decoded.pop("seq_id"), kind, decoded
    )


@router.post("/optim_step")
async def optim_step(body: OptimStep, tenant: TenantDep, store: StoreDep) -> dict[str, Any]:
    if body.adam_params is None:
        kind = (body.optimizer_params or {}).get("type")
        raise InvalidRequest(
            f"optimizer_params: {kind!r} is not supported (AdamParams only)", "optimizer_params"
        )
    payload = {"adam_params": body.adam_params.model_dump()}
    return await write_request(store, tenant, body.model_id, body.seq_id, "optim_step", payload)


# ---- futures ------------------------------------------------------------------------------
@router.post("/retrieve_future", response_model=None)
async def retrieve_future(
    body: FutureRef, request: Request, tenant: TenantDep, store: StoreDep
) -> dict[str, Any] | Response:
    """Long-polls the request's row: its result, its error, or `try_again` after a while."""
    deadline = time.monotonic() + LONG_POLL_SECONDS
    heard = getattr(request.app.state, "answers_heard", False)
    poll = HEARD_POLL_INTERVAL_SECONDS if heard else POLL_INTERVAL_SECONDS
    with store.changes.watching_answer(body.request_id) as answered:
        while True:
            answered.clear()  # before the read: an answer committed after it wakes the wait
            row = await run_in_threadpool(store.request, tenant, body.request_id)
            done = future_answer(row)
            if done is not None:
                return done
            left = deadline - time.monotonic()
            if left <= 0 or await request.is_disconnected():
                waiting = {"type": "try_again", "request_id": row.id, "queue_state": "active"}
                if row.seq_id == 0 and row.state == "pending":  # the SDK logs the reason
                    waiting["queue_state_reason"] = (
                        "waiting for a warm pack host of its base with memory for it"
                    )
                return waiting
            await answered.wait(min(left, poll))


def future_answer(row: TinkerRequestRow) -> dict[str, Any] | Response | None:
    """What `retrieve_future` answers for a finished row; None while it is not."""
    if row.state == FAILED:
        return {"error": row.error or "the request failed", "category": "user"}
    if row.state != DONE:
        return None
    result = row.result or {}
    if row.kind in ("forward_backward", "forward"):
        return Response(encode_forward_backward_output(result), media_type=PROTO_CONTENT_TYPE)
    if row.kind == "create_model":
        return {"type": "create_model", "model_id": row.model_id}
    if row.kind == SAMPLE:  # a sampler's answer (api/tinker/sampling.py)
        if "error" in result:
            return {"error": result["error"], "category": "user"}
        return Response(encode_sample_response(result), media_type=PROTO_CONTENT_TYPE)
    if "sampling_session_id" in row.payload:  # save_weights_for_sampler, no path
        return {**result, "sampling_session_id": row.payload["sampling_session_id"]}
    return result


router.include_router(weights.router)
router.include_router(sampling.router)
