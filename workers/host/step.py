"""One training step of a pack: every active job's rows through the shared base at once.

Free functions over an explicit `PackContext` (model, routing, rank, world size, how to
report) so that a one-shot run (`workers.recipe`) and a long-lived pack host share them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from workers.data.tokenization import collate
from workers.host.slot import JobSlot, SlotState
from workers.lora.packed_layer import Routing
from workers.training.chunked_loss import DEFAULT_CHUNK_TOKENS, chunked_next_token_loss
from workers.training.data_parallel import average_gradients

# Ray writes a worker's logging to its log files, where operators look for tracebacks.
logger = logging.getLogger("lorafleet.worker")

# (job_id or None for the whole pack, event type, message, data); a no-op off rank 0.
Report = Callable[[str | None, str, str, dict[str, Any] | None], None]


@dataclass
class PackContext:
    """What the step, publishing and checkpointing need to know about the running pack."""

    model: nn.Module
    routing: Routing
    pad_token_id: int
    device: torch.device
    rank: int
    world_size: int
    report: Report
    # Tokens whose fp32 logits the loss makes at a time (HostSpec.loss_chunk_tokens).
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS


def use_gradient_checkpointing(model: nn.Module, routing: Routing) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (less
    memory per job, one more forward per layer). Non-reentrant: ZeRO-3's module hooks gather
    the layer's shards again for the recompute. Each job's LoRA dropout draws from its own
    generator, which torch's checkpoint does not rewind: the recompute replays the draws of
    the forward, so the masks (and gradients) are those of a step without checkpointing."""
    model.activation_checkpointing_enable(  # type: ignore[operator]
        activation_checkpointing_kwargs={
            "use_reentrant": False,
            "context_fn": lambda: _replay_dropout(routing.generators),
        }
    )


def _replay_dropout(
    generators: dict[str, torch.Generator],
) -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
    """(forward context, recompute context) of one checkpointed layer call."""
    before = {name: g.get_state() for name, g in generators.items()}

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:
        after = {name: g.get_state() for name, g in generators.items()}
        for name, state in before.items():
            generators[name].set_state(state)
        try:
            yield
        finally:
            for name, state in after.items():
                generators[name].set_state(state)

    return contextlib.nullcontext(), recompute()


def report_job_failure(ctx: PackContext, job_id: str, exc: BaseException) -> None:
    """One job of the pack failed: its traceback goes to the worker's log, its error to
    the job's events; the rest of the pack trains on."""
    logger.error(
        "job %s failed on rank %d: %s",
        job_id,
        ctx.rank,
        exc,
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    ctx.report(
        job_id,
        "job_failed",
        f"Training failed: {type(exc).__name__}: {exc}",
        {"error": str(exc)},
    )


def fail_slot(ctx: PackContext, slot: JobSlot, exc: BaseException) -> None:
    slot.state = SlotState.FAILED
    report_job_failure(ctx, slot.job_id, exc)


def train_step(ctx: PackContext, active: list[JobSlot]) -> None:
    """Forward of all active slots' rows, per-job losses, backward, gradient sync, each
    slot's own optimizer step, then each job's metrics event (a non-finite loss fails it).

    Rows are padded per job, never to a pack-mate's width: slots are grouped by width and
    each group goes through the base in its own forward and backward, so a job's numerics
    (bf16 included) are the same packed as alone.
    """
    started = time.perf_counter()
    forward_s = backward_s = 0.0
    losses: dict[str, torch.Tensor] = {}
    tokens: dict[str, torch.Tensor] = {}
    for group in width_groups(active):
        group_started = time.perf_counter()
        width = width_of(group[0])
        shards = [slot.next_micro_batch(ctx.rank, ctx.world_size) for slot in group]
        ctx.routing.blocks = [
            (slot.job_id, len(shard)) for slot, shard in zip(group, shards, strict=True)
        ]
        batch = collate([e for shard in shards for e in shard], ctx.pad_token_id, width)
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        # The module itself, not the engine: the engine's forward/backward are built around
        # an optimizer it owns; ZeRO-3's gather/release hooks live on the module and run.
        logits = ctx.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        # Each job's own mean loss over its own tokens, in chunks of tokens (no fp32 copy of
        # the whole vocabulary's logits); their sum keeps gradients apart. The chunks are cut
        # within each job's own block, so a job's loss is the same packed as alone.
        # One split, not a slice per job: a slice's backward writes its gradient into a
        # zeroed copy of the whole batch's logits, once per job of the pack.
        rows = [len(shard) for shard in shards]
        group_losses = []
        for slot, job_logits, job_labels, job_mask in zip(
            group,
            logits.split(rows),
            batch["labels"].split(rows),
            batch["attention_mask"].split(rows),
            strict=True,
        ):
            group_losses.append(
                chunked_next_token_loss(job_logits, job_labels, ctx.loss_chunk_tokens)
            )
            losses[slot.job_id] = group_losses[-1]
            tokens[slot.job_id] = job_mask.sum()
        forward_done = time.perf_counter()
        torch.stack(group_losses).sum().backward()
        forward_s += forward_done - group_started
        backward_s += time.perf_counter() - forward_done
    ctx.routing.blocks = []
    backward_done = time.perf_counter()
    average_gradients([p for slot in active for p in slot.params], ctx.world_size)
    sync_done = time.perf_counter()
    first = {
        slot.job_id: dtypes_of(ctx, slot, losses[slot.job_id]) for slot in active if slot.step == 0
    }
    norms = [slot.apply_gradients() for slot in active]
    elapsed = time.perf_counter() - started
    phases = {
        "forward": forward_s,
        "backward": backward_s,
        "gradient_sync": sync_done - backward_done,
        "optimizer": elapsed - (sync_done - started),
    }
    # Every job's loss and tokens in one tensor: one all-reduce and one sync for the metrics.
    totals = torch.stack(
        [torch.stack([losses[s.job_id].detach().float(), tokens[s.job_id].float()]) for s in active]
    )
    dist.all_reduce(totals)
    reduced = totals.tolist()
    pack_tokens = sum(slot_tokens for _, slot_tokens in reduced)
    for slot, (loss_sum, slot_tokens), norm in zip(active, reduced, norms, strict=True):
        mean_loss = loss_sum / ctx.world_size
        slot.trained_tokens += int(slot_tokens)
        slot.last_loss = mean_loss
        if not math.isfinite(mean_loss):
            fail_slot(
                ctx,
                slot,
                FloatingPointError(f"training loss became {mean_loss} at step {slot.step}"),
            )
            continue
        ctx.report(
            slot.job_id,
            "metrics",
            f"Step {slot.step}/{slot.total_steps}: training loss={mean_loss:.4f}",
            {
                "step": slot.step,
                "total_steps": slot.total_steps,
                "train_loss": mean_loss,
                "learning_rate": slot.learning_rate,
                "grad_norm": norm,
                "tokens_per_second": slot_tokens / elapsed,
                "pack_tokens_per_second": pack_tokens / elapsed,
                "pack_size": len(active),
                "step_seconds": elapsed,
                "phase_seconds": phases,
                "trained_tokens": slot.trained_tokens,
                **(
                    {"dtypes": _with_adam(first[slot.job_id], slot)} if slot.job_id in first else {}
                ),
            },
        )


def dtypes_of(ctx: PackContext, slot: JobSlot, loss: torch.Tensor) -> dict[str, str]:
    """What the job really trains in (reported with its first step): the frozen base in the
    run's precision; its LoRA factors, their gradients, Adam's state and the loss in fp32."""
    base = next(p for name, p in ctx.model.named_parameters() if ".lora_" not in name)
    factor = slot.params[0]
    return {
        "base": str(base.dtype).removeprefix("torch."),
        "lora": str(factor.dtype).removeprefix("torch."),
        "lora_grad": str(factor.grad.dtype).removeprefix("torch.")
        if factor.grad is not None
        else "none",
        "loss": str(loss.dtype).removeprefix("torch."),
    }


def _with_adam(dtypes: dict[str, str], slot: JobSlot) -> dict[str, str]:
    assert slot.optimizer is not None
    state = slot.optimizer.state.get(slot.params[0], {})
    moment = state.get("exp_avg")
    return {
        **dtypes,
        "adam_state": str(moment.dtype).removeprefix("torch.") if moment is not None else "none",
    }


# Widths are rounded up to a multiple of this, so jobs of similar lengths share a forward.
WIDTH_BUCKET = 16


def width_of(slot: JobSlot, bucket: int = WIDTH_BUCKET) -> int:
    """The padded width of a job's rows at its current step: from the job's own global batch
    only (the same on every rank, and the same alone or packed), rounded up to a bucket so
    that jobs of similar lengths share a forward."""
    longest = max(len(slot.examples[i].input_ids) for i in slot.batches[slot.step])
    return -(-longest // bucket) * bucket


def width_groups(active: list[JobSlot]) -> list[list[JobSlot]]:
    """Active slots grouped by width, narrowest first (a fixed order on every rank)."""
    groups: dict[int, list[JobSlot]] = {}
    for slot in active:
        groups.setdefault(width_of(slot), []).append(slot)
    return [groups[width] for width in sorted(groups)]
