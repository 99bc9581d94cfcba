"""Tinker sampling (issue 21): sampling sessions and `asample`, as the SDK's SamplingClient
calls them.

    POST /api/v1/create_sampling_session  {session_id, sampling_session_seq_id, model_path?}
    GET  /api/v1/samplers/{sampling_session_id}
    POST /api/v1/asample                  {sampling_session_id, seq_id, prompt, sampling_params}

A sample is a `sample` row (unique per sampling session and seq_id: a retry gets the first
future) that the scheduler's dispatcher hands to the base's sampler actor; its answer goes
back from `retrieve_future` as the SDK's protobuf `SampleResponse`. Each sampled token's
logprob is the base+adapter's log_softmax at that position (temperature does not change it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import Field

from api.deps import ServicesDep
from api.tinker.common import Body, StoreDep, TenantDep
from api.tinker.wire import messages
from orchestrator.errors import InvalidRequest
from orchestrator.store import new_id
from orchestrator.tinker.rows import SAMPLE, TinkerModelRow
from orchestrator.tinker.samplers import create_sampler, sampler
from orchestrator.tinker.store import SessionEnded, TinkerStore

router = APIRouter()

MAX_SAMPLES, MAX_TOKENS = 64, 4096


class CreateSamplingSession(Body):
    session_id: str
    sampling_session_seq_id: int = Field(ge=0)
    base_model: str | None = None
    model_path: str | None = None


class Chunk(Body):
    type: str = "encoded_text"
    tokens: list[int] = Field(default_factory=list)


class Prompt(Body):
    chunks: list[Chunk] = Field(min_length=1)

    def tokens(self) -> list[int]:
        if any(c.type != "encoded_text" for c in self.chunks):
            raise InvalidRequest("prompt.chunks: only encoded_text chunks are read", "prompt")
        return [t for c in self.chunks for t in c.tokens]


class Params(Body):
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    seed: int | None = None
    stop: str | list[int] | list[str] | None = None
    temperature: float = Field(default=1.0, ge=0)
    top_k: int = -1
    top_p: float = Field(default=1.0, gt=0, le=1)


class SampleRequest(Body):
    num_samples: int = Field(default=1, ge=1, le=MAX_SAMPLES)
    prompt: Prompt
    sampling_params: Params
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: int | None = Field(default=None, ge=0)
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0


async def source(
    services: ServicesDep, store: TinkerStore, tenant: str, base: str | None, path: str | None
) -> tuple[str, str | None]:
    """(base model, adapter prefix) of a `model_path` of the tenant's, else of `base_model`."""
    if path is not None:
        from api.tinker.weights import _saved  # the path's checkpoint, tenant-scoped (404)

        model, prefix, _ = await _saved(services, store, tenant, path)
        return model.base_model, prefix
    if base is None or base not in services.settings.base_models:
        raise InvalidRequest(f"base_model: {base!r} is not served here", "base_model")
    return base, None


@router.post("/create_sampling_session")
async def create_sampling_session(
    body: CreateSamplingSession, tenant: TenantDep, store: StoreDep, services: ServicesDep
) -> dict[str, Any]:
    base, prefix = await source(services, store, tenant, body.base_model, body.model_path)
    try:
        row = await run_in_threadpool(
            create_sampler,
            store,
            tenant,
            body.session_id,
            body.sampling_session_seq_id,
            base,
            body.model_path,
            prefix,
        )
    except SessionEnded as exc:
        raise InvalidRequest(str(exc), "session_id") from exc
    return {"type": "create_sampling_session", "sampling_session_id": row.id}


@router.get("/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, tenant: TenantDep, store: StoreDep) -> dict[str, Any]:
    row: TinkerModelRow = await run_in_threadpool(sampler, store, tenant, sampler_id)
    return {
        "sampler_id": row.id,
        "base_model": row.base_model,
        "model_path": row.lora.get("model_path"),
    }


@router.post("/asample")
async def asample(
    body: SampleRequest, tenant: TenantDep, store: StoreDep, services: ServicesDep
) -> dict[str, Any]:
    if body.prompt_logprobs or body.topk_prompt_logprobs or body.topk_sample_logprobs:
        raise InvalidRequest(
            "prompt_logprobs: prompt and top-k logprobs are not computed yet", "prompt_logprobs"
        )
    params = body.sampling_params
    if params.max_tokens is None:
        raise InvalidRequest("sampling_params.max_tokens: required", "sampling_params.max_tokens")
    if body.sampling_session_id is not None:
        if body.seq_id is None:
            raise InvalidRequest("seq_id: required with sampling_session_id", "seq_id")
        session = await run_in_threadpool(sampler, store, tenant, body.sampling_session_id)
        owner, seq = session.id, body.seq_id
        base, prefix = session.base_model, session.lora.get("adapter_prefix")
    else:
        base, prefix = await source(services, store, tenant, body.base_model, body.model_path)
        owner, seq = f"sample:{new_id('tsmp')}", 0
    stop = params.stop
    strings = [stop] if isinstance(stop, str) else [s for s in stop or [] if isinstance(s, str)]
    payload = {
        "base_model": base,
        "adapter_prefix": prefix,
        "prompt_tokens": body.prompt.tokens(),
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": max(params.top_k, 0),
        "seed": params.seed,
        "n": body.num_samples,
        "stop": strings,
        "stop_tokens": [s for s in stop or [] if isinstance(s, int)],
        "stop_at_eos": stop is None,  # the SDK: None keeps EOS, [] stops at nothing
    }
    if not payload["prompt_tokens"]:
        raise InvalidRequest("prompt: it has no tokens", "prompt")
    row = await run_in_threadpool(store.add_request, tenant, owner, seq, SAMPLE, payload)
    return {
        "request_id": row.id,
        "model_id": owner,
        "sample_sequence_ids": [f"{row.id}:{i}" for i in range(body.num_samples)],
    }


def encode_sample_response(result: dict[str, Any]) -> bytes:
    """A sampler's answer as the SDK's protobuf SampleResponse."""
    pb = messages()
    out = pb.SampleResponse()
    for choice in result["choices"]:
        seq = out.sequences.add()
        seq.stop_reason = (
            pb.STOP_REASON_STOP if choice["finish_reason"] == "stop" else pb.STOP_REASON_LENGTH
        )
        seq.tokens = np.asarray(choice["tokens"], dtype=np.int32).tobytes()
        seq.logprobs = np.asarray(choice["logprobs"], dtype=np.float32).tobytes()
    data: bytes = out.SerializeToString()
    return data


__all__ = ["encode_sample_response", "router"]
