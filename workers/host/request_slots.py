"""Request-driven slots (issue 21): a Tinker training client's model is a slot of the pack
host, driven by its client's requests instead of a dataset. At a step boundary the host
actor hands every rank the same queued requests (workers.host.requests); each runs in its
model's seq_id order through the shared base: `forward_backward` adds the gradient of its
loss to the slot's factors, `optim_step` steps the slot's own AdamW with the request's
parameters and clears them; rank 0 keeps the answers for the next boundary. With jobs
training, each model's next forward work rides in their step instead (workers.host.step_riders).
Saving, loading and moving a model's weights is workers.host.request_weights.

Every rank runs every request on all of its data (ZeRO-3's gathers are collectives), so the
gradients agree without an all-reduce; splitting the data by rank is left to do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from core.host_protocol import RELOCATE, RESTORE
from core.objectstore import ObjectStore
from core.tinker_memory import tinker_targets
from core.usage import request_tokens, split_device_seconds
from workers.host.request_losses import loss_pass, padded_width
from workers.host.request_slot import RequestError, RequestSlot
from workers.host.request_weights import RequestWeights
from workers.host.slot_moves import held_grads, put_back_grads
from workers.host.step import WIDTH_BUCKET
from workers.host.step_riders import LOSS_KINDS
from workers.host.tinker_losses import LOSSES
from workers.lora.packed_layer import (
    PackedLoraLinear,
    Routing,
    SlotConfig,
    matching_linear_layers,
    output_layer_path,
    slot_parameters,
)

logger = logging.getLogger("lorafleet.worker")

LORA_ALPHA = 32.0  # Tinker's own choice: the scale is alpha / rank


class RequestSlots(RequestWeights):
    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, PackedLoraLinear],
        routing: Routing,
        device: torch.device,
        pad_token_id: int,
        rank: int,
        store: Callable[[], ObjectStore] | None = None,
        world_size: int = 1,
    ) -> None:
        self.model, self.layers, self.routing = model, layers, routing
        self.store = store  # the object store, opened on first use (saves and loads)
        self.device, self.pad_token_id, self.rank = device, pad_token_id, rank
        self.world_size = world_size  # every rank runs every request: all devices are busy
        self.slots: dict[str, RequestSlot] = {}
        self.answers: list[dict[str, Any]] = []

    def live(self) -> list[str]:
        return sorted(self.slots)

    def take_answers(self) -> list[dict[str, Any]]:
        answers, self.answers = self.answers, []
        return answers

    def run(self, requests: list[dict[str, Any]]) -> None:
        """Each request in order; one that fails is answered with its error alone."""
        handlers = {
            "create_model": self._create,
            "forward_backward": self._forward_backward,
            "forward": self._forward,
            "optim_step": self._optim_step,
            "drop_model": self._drop,
            "save_weights": self._save,
            "load_weights": self._load,
            RELOCATE: self._relocate,  # a drain or a host's end (workers.host.slot_moves)
            RESTORE: self._restore,
        }
        queue = list(requests)
        while queue:
            try:
                group = self._loss_group(queue)
            except Exception:  # noqa: BLE001 - a malformed request: it runs alone, below
                group = []
            if len(group) > 1:  # several models' forward work: one pass through the base
                started = time.perf_counter()
                try:
                    results = self._run_losses(group)
                except Exception as exc:  # noqa: BLE001 - each is tried alone below
                    logger.warning("a packed Tinker forward failed, each alone: %s", exc)
                else:
                    usage = self._usage(group, time.perf_counter() - started)
                    for done, outcome, used in zip(group, results, usage, strict=True):
                        self.answer(done, outcome, None, used)
                    queue = [r for r in queue if all(r is not g for g in group)]
                    continue
                finally:
                    self.routing.blocks = []
            request = queue.pop(0)
            result: dict[str, Any] | None = None
            error: str | None = None
            started = time.perf_counter()
            try:
                handler = handlers.get(request["kind"])
                if handler is None:
                    raise RequestError(f"unknown request kind {request['kind']!r}")
                result = handler(request["model_id"], request["payload"])
            except Exception as exc:  # noqa: BLE001 - this request alone fails
                logger.warning("Tinker request %s failed: %s", request["request_id"], exc)
                error = f"{type(exc).__name__}: {exc}"
            finally:
                self.routing.blocks = []
            seconds = time.perf_counter() - started
            if error is not None:  # its device time was spent; its tokens did not count
                used = {"tokens": {}, "device_seconds": seconds * self.world_size}
            else:
                (used,) = self._usage([request], seconds)
            self.answer(request, result, error, used)

    def _usage(self, requests: list[dict[str, Any]], seconds: float) -> list[dict[str, Any]]:
        """Each request's usage of one pass (core.usage): its tokens, and its share of the
        pass's device-seconds by tokens (a request alone in its pass has all of them)."""
        tokens = [request_tokens(r["kind"], r["payload"]) for r in requests]
        shares = split_device_seconds(
            seconds, self.world_size, {str(i): sum(t.values()) for i, t in enumerate(tokens)}
        )
        return [{"tokens": t, "device_seconds": shares[str(i)]} for i, t in enumerate(tokens)]

    def _loss_group(self, queue: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """When the first queued request is forward work: the next request of every model
        that is forward work too (each model's own order kept), to go through the base in
        one pass, each model's rows through its own factors (`Routing.blocks`)."""
        if queue[0]["kind"] not in LOSS_KINDS:
            return []
        heads: dict[str, dict[str, Any]] = {}
        for request in queue:
            heads.setdefault(request["model_id"], request)
        # Only those of the first one's padded width: a model padded wider than it would be
        # alone would not get its own results bit for bit (padding changes the sums).
        width = _padded_width(queue[0])
        return [
            r
            for r in heads.values()
            if r["kind"] in LOSS_KINDS
            and r["model_id"] in self.slots
            and r["payload"].get("loss_fn") in LOSSES
            and width is not None
            and _padded_width(r) == width
        ]

    def answer(
        self,
        request: dict[str, Any],
        result: dict[str, Any] | None,
        error: str | None,
        usage: dict[str, Any] | None = None,
    ) -> None:
        if self.rank == 0:
            self.answers.append(
                {
                    "request_id": request["request_id"],
                    "model_id": request["model_id"],
                    "kind": request["kind"],
                    "result": result,
                    "error": error,
                    "usage": usage,  # the tenant's, added once the answer is stored
                }
            )

    # ---- the requests ----------------------------------------------------------------------
    def _create(self, model_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        if model_id in self.slots:
            return {"model_id": model_id}
        lora = payload["lora"]
        # The SDK's flags -> the layers they adapt (as admission counts them: core.tinker_memory).
        names = list(tinker_targets(lora))
        paths = matching_linear_layers(self.model, names) if names else []
        if lora.get("train_unembed", True):  # the SDK's default: lm_head is trained too
            output = output_layer_path(self.model)
            if output is None:
                raise RequestError("train_unembed: this base's output layer is not linear")
            paths.append(output)
        paths = sorted(p for p in paths if p in self.layers)
        if not paths:
            raise RequestError(
                "train_mlp, train_attn and train_unembed match no adaptable layer of this base"
            )
        config = SlotConfig(name=model_id, r=int(lora["rank"]), alpha=LORA_ALPHA)
        init = torch.Generator(device="cpu")
        init.manual_seed(int(lora.get("seed") or 0))
        for path in paths:
            self.layers[path].add_slot(config, init, self.device)
        slot = RequestSlot(model_id, config, paths, slot_parameters(self.model, model_id))
        self.slots[model_id] = slot
        return {"model_id": model_id}

    def _drop(self, model_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        for layer in self.layers.values():
            layer.remove_slot(model_id)
        self.slots.pop(model_id, None)
        return {}

    def _slot(self, model_id: str) -> RequestSlot:
        slot = self.slots.get(model_id)
        if slot is None:
            raise RequestError(f"model {model_id} is not on this host")
        return slot

    def _run_losses(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Forward (and backward) work of one or more models in one pass through the base:
        each model's rows through its own factors, each its own loss; the backward of their
        sum adds to each model's own factors only (no factor is shared)."""
        for request in requests:
            self._slot(request["model_id"])
            if request["payload"]["loss_fn"] not in LOSSES:
                raise RequestError(
                    f"loss_fn {request['payload']['loss_fn']!r} is not supported yet"
                )
        # A failed pass adds nothing to any model's gradients (its requests may run again,
        # each alone), and a `forward` never adds to its own (workers.host.slot_moves): the
        # backward gives its rows zeros, so its gradients need no copy.
        held = []
        for request in requests:
            params = self.slots[request["model_id"]].params
            held.append((params, held_grads(params, copy=request["kind"] == "forward_backward")))
        try:
            results = loss_pass(
                self.model, self.routing, self.device, self.pad_token_id, WIDTH_BUCKET, requests
            )
        except Exception:
            for params, grads in held:
                put_back_grads(params, grads)
            raise
        for request, (params, grads) in zip(requests, held, strict=True):
            if request["kind"] != "forward_backward":
                put_back_grads(params, grads)
        return results

    def _forward_backward(self, model_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        request = {"model_id": model_id, "kind": "forward_backward", "payload": payload}
        return self._run_losses([request])[0]

    def _forward(self, model_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self._run_losses([{"model_id": model_id, "kind": "forward", "payload": payload}])[0]

    def _optim_step(self, model_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        """AdamW with the request's AdamParams (decoupled weight decay), after clipping the
        summed gradients to `grad_clip_norm` (0: no clipping)."""
        slot = self._slot(model_id)
        adam = payload["adam_params"]
        hyper: dict[str, Any] = {
            "lr": float(adam["learning_rate"]),
            "betas": (float(adam["beta1"]), float(adam["beta2"])),
            "eps": float(adam["eps"]),
            "weight_decay": float(adam["weight_decay"]),
        }
        if slot.optimizer is None:
            slot.optimizer = torch.optim.AdamW(slot.params, **hyper)
        for group in slot.optimizer.param_groups:
            group.update(hyper)
        clip = float(adam.get("grad_clip_norm") or 0.0)
        with_grad = [p for p in slot.params if p.grad is not None]
        norm = (
            float(torch.nn.utils.clip_grad_norm_(with_grad, clip if clip > 0 else float("inf")))
            if with_grad
            else 0.0
        )
        slot.optimizer.step()
        slot.optimizer.zero_grad(set_to_none=True)
        slot.steps += 1
        return {"metrics": {"grad_norm:mean": norm}}


def _padded_width(request: dict[str, Any]) -> int | None:
    """The width a request's rows are padded to (None for a malformed one: it runs alone
    and is answered with its error)."""
    try:
        return padded_width([len(d["tokens"]) for d in request["payload"]["data"]], WIDTH_BUCKET)
    except (KeyError, TypeError, ValueError):
        return None
