"""Trying a model (issue 21): OpenAI's completions and chat completions on a base, a
fine-tuned model (`ft:…`) or a checkpoint (`ftckpt-…`) of the caller's tenant.

    POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", …}
    POST /v1/chat/completions   {"model", "messages", "max_tokens", …}

The API never samples (a replica imports no torch): the request becomes a `sample` row that
the scheduler's Tinker dispatcher hands to the base's sampler actor; this handler waits for
the row's answer (orchestrator.tinker.sampling, workers.sampling).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api.deps import ServicesDep, TenantDep
from api.errors import error_response
from api.tinker.common import StoreDep
from orchestrator.completions import sample_source
from orchestrator.errors import InvalidRequest
from orchestrator.store import new_id
from orchestrator.tinker.rows import DONE, FAILED, SAMPLE
from orchestrator.tinker.store import TinkerStore

router = APIRouter(prefix="/v1", tags=["completions"])

WAIT_SECONDS = 300.0  # a sampler starting on its first request loads its base first
POLL_SECONDS = 0.05
MAX_TOKENS, MAX_N, MAX_STOPS = 4096, 16, 4


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(default=1.0, ge=0, le=2)  # 0: greedy
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False

    def payload(self) -> dict[str, Any]:
        if self.stream:
            raise InvalidRequest("stream: streamed answers are not supported yet", "stream")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOPS or any(not s for s in stop):
            raise InvalidRequest(f"stop: up to {MAX_STOPS} non-empty strings", "stop")
        return {
            "max_tokens": self.max_tokens or 16,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "n": self.n,
            "stop": stop,
            "seed": self.seed,
        }


class Completion(Sampling):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]

    def text(self, index: int) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" for part in self.content):
            raise InvalidRequest(
                f"messages[{index}].content: only text parts are supported",
                f"messages[{index}].content",
            )
        return "".join(str(part.get("text", "")) for part in self.content)


class ChatCompletion(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


@router.post("/completions", response_model=None)
async def completions(
    body: Completion, tenant: TenantDep, services: ServicesDep, store: StoreDep
) -> dict[str, Any] | JSONResponse:
    if body.echo:
        raise InvalidRequest("echo: echoing the prompt is not supported", "echo")
    payload = body.payload()
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise InvalidRequest("prompt: one prompt per request", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, list):
        payload["prompt_tokens"] = prompt
    else:
        payload["prompt"] = prompt
    answer = await _sample(services, store, tenant, body.model, payload)
    if isinstance(answer, JSONResponse):
        return answer
    choices = []
    for index, choice in enumerate(answer["choices"]):
        logprobs = None
        if body.logprobs is not None:
            offsets, at = [], 0
            for piece in choice["token_strings"]:
                offsets.append(at)
                at += len(piece)
            logprobs = {
                "tokens": choice["token_strings"],
                "token_logprobs": choice["logprobs"],
                "top_logprobs": None,  # alternatives are not computed
                "text_offset": offsets,
            }
        choices.append(
            {
                "index": index,
                "text": choice["text"],
                "finish_reason": choice["finish_reason"],
                "logprobs": logprobs,
            }
        )
    return _envelope("cmpl", "text_completion", body.model, choices, answer)


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletion, tenant: TenantDep, services: ServicesDep, store: StoreDep
) -> dict[str, Any] | JSONResponse:
    payload = body.payload()
    payload["max_tokens"] = body.max_completion_tokens or body.max_tokens or 16
    payload["messages"] = [
        {"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)
    ]
    answer = await _sample(services, store, tenant, body.model, payload)
    if isinstance(answer, JSONResponse):
        return answer
    choices = []
    for index, choice in enumerate(answer["choices"]):
        content = None
        if body.logprobs:
            content = [
                {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                for t, lp in zip(choice["token_strings"], choice["logprobs"], strict=True)
            ]
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": choice["text"]},
                "finish_reason": choice["finish_reason"],
                "logprobs": {"content": content} if content is not None else None,
            }
        )
    return _envelope("chatcmpl", "chat.completion", body.model, choices, answer)


async def _sample(
    services: ServicesDep, store: TinkerStore, tenant: str, model: str, payload: dict[str, Any]
) -> dict[str, Any] | JSONResponse:
    """Writes the sampling row and waits for its answer."""
    base, prefix = await run_in_threadpool(
        sample_source,
        services.store,
        services.objects,
        services.settings.base_models,
        tenant,
        model,
    )
    payload.update(base_model=base, adapter_prefix=prefix)
    owner = f"completion:{new_id('cmpl')}"
    row = await run_in_threadpool(store.add_request, tenant, owner, 0, SAMPLE, payload)
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        row = await run_in_threadpool(store.request, tenant, row.id)
        if row.state == DONE:
            result = row.result or {}
            if "error" in result:
                raise InvalidRequest(str(result["error"]), result.get("param"))
            return result
        if row.state == FAILED:
            return error_response(503, f"sampling failed: {row.error}", "model", "sampler_failed")
        if time.monotonic() >= deadline:
            return error_response(
                504, "no sampler answered in time (is the scheduler running?)", "model"
            )
        await asyncio.sleep(POLL_SECONDS)


def _envelope(
    prefix: str, kind: str, model: str, choices: list[dict[str, Any]], answer: dict[str, Any]
) -> dict[str, Any]:
    completion = sum(len(c["tokens"]) for c in answer["choices"])
    return {
        "id": new_id(prefix),
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": answer["prompt_tokens"],
            "completion_tokens": completion,
            "total_tokens": answer["prompt_tokens"] + completion,
        },
        "system_fingerprint": None,
    }
