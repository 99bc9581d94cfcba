"""Tinker models' queued forward work riding in a pack step (issue 21, one step for both
kinds of member): each model's next `forward_backward`/`forward` joins the forward of the
job rows of its width (`workers.host.step.train_step`), its rows through its own factors,
its loss and gradient its own. Its gradients add to its factors until its `optim_step`; a
`forward`, or a request that fails, leaves them as they were before the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from core.usage import request_tokens
from workers.host.request_losses import padded_width, request_losses, request_rows
from workers.host.slot_moves import HeldGrads, held_grads, put_back_grads
from workers.host.tinker_losses import LOSSES

if TYPE_CHECKING:
    from workers.host.request_slots import RequestSlots

# The request kinds that are forward work (and may ride a step).
LOSS_KINDS = ("forward_backward", "forward")

# Answers a request: (request, result, error, usage), as RequestSlots._answer.
Answer = Callable[[dict[str, Any], dict[str, Any] | None, str | None, dict[str, Any]], None]


@dataclass
class Rider:
    """One request of one Tinker model, padded to its own width."""

    request: dict[str, Any]
    width: int
    ids: torch.Tensor
    mask: torch.Tensor
    result: dict[str, Any] | None = None
    error: str | None = None

    @property
    def model_id(self) -> str:
        return str(self.request["model_id"])


@dataclass
class StepRiders:
    """The Tinker requests of one step, grouped by width; answered once the step is done."""

    riders: list[Rider]
    device: torch.device
    answer: Answer
    # Each rider's model's factors and their gradients before the step (the step's backward
    # reaches every factor of the forward it went through, zero gradients included).
    held: dict[str, tuple[list[nn.Parameter], HeldGrads]] = field(default_factory=dict)
    _failed: dict[str, str] = field(default_factory=dict)

    def widths(self) -> set[int]:
        return {r.width for r in self.riders}

    def of_width(self, width: int) -> list[Rider]:
        return [r for r in self.riders if r.width == width]

    def rows(self, width: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, int]]]:
        """(input ids, attention mask, routing blocks) of the riders of `width`."""
        riders = self.of_width(width)
        return (
            torch.cat([r.ids for r in riders]),
            torch.cat([r.mask for r in riders]),
            [(r.model_id, len(r.ids)) for r in riders],
        )

    def fail(self, model_id: str, exc: BaseException) -> None:
        """A model's slot math raised in the shared forward: its request alone fails."""
        self._failed[model_id] = f"{type(exc).__name__}: {exc}"

    def loss_grad(self, width: int, logits: torch.Tensor) -> torch.Tensor:
        """Each rider's losses from its block of `logits` (rows of `width`), its results
        kept; the gradient of the `forward_backward` riders' summed loss with respect to the
        block (zeros for `forward` work and failures): their part of the shared backward."""
        grads = []
        riders = self.of_width(width)
        for rider, block in zip(riders, logits.split([len(r.ids) for r in riders]), strict=True):
            grad = torch.zeros_like(block)
            try:
                if rider.model_id in self._failed:
                    raise RuntimeError(self._failed[rider.model_id])
                total, result = request_losses(rider.request, block, self.device)
                if rider.request["kind"] == "forward_backward":
                    (grad,) = torch.autograd.grad(total, block)
                rider.result = result
            except Exception as exc:  # noqa: BLE001 - this request alone fails
                rider.error = f"{type(exc).__name__}: {exc}"
            grads.append(grad)
        return torch.cat(grads)

    def tokens(self) -> dict[str, int]:
        """Each rider's tokens, keyed apart from job ids, for the step's usage split."""
        return {
            f"request:{i}": sum(request_tokens(r.request["kind"], r.request["payload"]).values())
            for i, r in enumerate(self.riders)
        }

    def finish(self, device_seconds: dict[str, float]) -> None:
        """Answers every rider with its result (or error) and its share of the step; a
        `forward` or a failed request leaves its factors' gradients as they were before it
        (the step gave it zeros, and made a zero gradient where there was none)."""
        for i, rider in enumerate(self.riders):
            if rider.model_id in self._failed and rider.error is None:
                rider.error, rider.result = self._failed[rider.model_id], None
            if rider.error is not None or rider.request["kind"] != "forward_backward":
                put_back_grads(*self.held[rider.model_id])
            used = {
                "tokens": request_tokens(rider.request["kind"], rider.request["payload"]),
                "device_seconds": device_seconds.get(f"request:{i}", 0.0),
            }
            if rider.error is not None:  # its device time was spent; its tokens did not count
                used["tokens"] = {}
            self.answer(rider.request, rider.result, rider.error, used)


def make_rider(request: dict[str, Any], pad_token_id: int, vocab_size: int, bucket: int) -> Rider:
    """A request's rows, checked before they join a shared forward: a bad datum fails its
    request alone, never its mates' step (raises ValueError)."""
    data = request["payload"]["data"]
    if not data or any(not d.get("tokens") for d in data):
        raise ValueError("every datum needs at least one token")
    for d in data:
        if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in d["tokens"]):
            raise ValueError(f"tokens must be ids in [0, {vocab_size})")
    width = padded_width([len(d["tokens"]) for d in data], bucket)
    ids, mask = request_rows(data, pad_token_id, width)
    return Rider(request, width, ids, mask)


def take_riders(
    queue: list[dict[str, Any]], slots: RequestSlots, bucket: int
) -> tuple[StepRiders | None, list[dict[str, Any]]]:
    """(the riders of this step, the requests left to run after it): the next request of
    every model when it is forward work of a model on this host (so each model's requests
    still run in order). A request whose rows are bad is answered with its error at once."""
    heads: dict[str, dict[str, Any]] = {}
    for request in queue:
        heads.setdefault(request["model_id"], request)
    chosen = [r for r in heads.values() if _may_ride(r, slots)]
    rest = [r for r in queue if all(r is not c for c in chosen)]
    vocab = int(cast(Any, slots.model).config.vocab_size)  # a transformers model
    riders = []
    for request in chosen:
        try:
            riders.append(make_rider(request, slots.pad_token_id, vocab, bucket))
        except Exception as exc:  # noqa: BLE001 - this request alone fails
            slots.answer(
                request, None, f"{type(exc).__name__}: {exc}", {"tokens": {}, "device_seconds": 0.0}
            )
    if not riders:
        return None, rest
    # Not copied: a rider that fails, or a `forward`, gets a zero gradient for its rows
    # (`loss_grad`), so the step can only add zeros to its factors.
    params = {r.model_id: slots.slots[r.model_id].params for r in riders}
    held = {model_id: (p, held_grads(p, copy=False)) for model_id, p in params.items()}
    return StepRiders(riders, slots.device, slots.answer, held), rest


def _may_ride(request: dict[str, Any], slots: RequestSlots) -> bool:
    """Forward work of a model on this host with a loss the step computes; a malformed
    request does not ride (it runs alone after the step and is answered with its error)."""
    payload = request.get("payload")
    return (
        request.get("kind") in LOSS_KINDS
        and request.get("model_id") in slots.slots
        and isinstance(payload, dict)
        and payload.get("loss_fn") in LOSSES
    )
