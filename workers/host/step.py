"""One training step of a pack: every active job's rows through the shared base at once.

Free functions over an explicit `PackContext` (model, routing, rank, world size, how to
report), called by each worker of a pack host (`workers.host.worker_loop`) and by tests.
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

from core.fault_injection import StepFault, StepPhase
from core.usage import split_device_seconds
from workers.data.tokenization import collate
from workers.host.failures import StepFailures, fail_agreed
from workers.host.objective import reference_logprobs
from workers.host.slot import JobSlot, SlotState
from workers.host.step_riders import StepRiders
from workers.lora.packed_layer import Routing
from workers.training.chunked_loss import (
    DEFAULT_CHUNK_TOKENS,
    chunked_token_accuracy,
)
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
    # TEST HOOK: HostSpec.test_faults (core.fault_injection); empty outside tests.
    faults: tuple[StepFault, ...] = ()


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


def train_step(ctx: PackContext, active: list[JobSlot], riders: StepRiders | None = None) -> None:
    """Forward of all active slots' rows, per-job losses, backward, gradient sync, each
    slot's own optimizer step, then each job's metrics event (a non-finite loss fails it).

    Rows are padded per job, never to a pack-mate's width: slots are grouped by width and
    each group goes through the base in its own forward and backward, so a job's numerics
    (bf16 included) are the same packed as alone.

    A job whose own part of the step raises (its slot math, loss, loss backward or optimizer
    step) fails alone (workers.host.failures): its rows get no delta and no gradient, every
    rank still makes the same collectives, and the others' numbers are those of a step
    without it (rows never mix), so they still equal their solo twins.

    `riders`: Tinker models' queued forward work (workers.host.step_riders), each request's
    rows in the forward of its width beside the jobs' (or in one of their own), its loss and
    gradient its own; their gradients add up until their own `optim_step`. They share the
    step's device-seconds by tokens and are answered once it is done.
    """
    started = time.perf_counter()
    forward_s = backward_s = 0.0
    failures = StepFailures(ctx.rank, ctx.faults)
    if ctx.faults:  # TEST HOOK: a worker crash as a job's step starts
        for slot in active:
            failures.check(slot, "crash")
    losses: dict[str, torch.Tensor] = {}
    tokens: dict[str, torch.Tensor] = {}
    right: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (tokens right, tokens counted)
    stats: dict[str, torch.Tensor] = {}  # each objective's own statistics (DPO's rewards)
    by_width = {width_of(group[0]): group for group in width_groups(active)}
    rider_widths = riders.widths() if riders is not None else set()
    for width in sorted(set(by_width) | rider_widths):
        group = by_width.get(width, [])
        group_started = time.perf_counter()
        reference = _reference_pass(ctx, group, failures)
        logits, labels, mask, rows = _group_forward(ctx, group, width, failures, riders)
        forward_done = time.perf_counter()
        grads = []
        job_logits_all = logits[: sum(rows)]
        for slot, job_logits, job_labels, job_mask in zip(
            group, job_logits_all.split(rows), labels.split(rows), mask.split(rows), strict=True
        ):
            tokens[slot.job_id] = job_mask.sum()
            # From the same logits, chunk by chunk, without gradient (train_mean_token_accuracy).
            right[slot.job_id] = chunked_token_accuracy(
                job_logits, job_labels, ctx.loss_chunk_tokens
            )
            grads.append(
                _job_loss_grad(
                    ctx,
                    slot,
                    (job_logits, job_labels, reference.get(slot.job_id)),
                    failures,
                    losses,
                    stats,
                )
            )
        if riders is not None and width in rider_widths:
            grads.append(riders.loss_grad(width, logits[sum(rows) :]))
        # The base's backward, shared by the group (a collective under ZeRO-3): every rank
        # makes it whatever failed; a failed job's block carries no gradient.
        logits.backward(torch.cat(grads))
        _record_failures(ctx, failures, riders, "backward")  # in a recompute
        ctx.routing.failures = None
        forward_s += forward_done - group_started
        backward_s += time.perf_counter() - forward_done
    ctx.routing.blocks = []
    backward_done = time.perf_counter()
    # Who failed rides in the gradient all-reduce: every rank drops the same jobs.
    summed = average_gradients(
        [p for slot in active for p in slot.params],
        ctx.world_size,
        agree=failures.flags(active, ctx.device),
    )
    assert summed is not None
    failed = {
        s.job_id for s in fail_agreed(failures, active, summed.tolist(), ctx.report, ctx.world_size)
    }
    trained = [slot for slot in active if slot.job_id not in failed]
    sync_done = time.perf_counter()
    first = {
        slot.job_id: dtypes_of(ctx, slot, losses[slot.job_id]) for slot in trained if slot.step == 0
    }
    norms = {}
    for slot in trained:
        try:
            failures.check(slot, "optimizer")
            norms[slot.job_id] = slot.apply_gradients()
        except Exception as exc:  # noqa: BLE001 - this job alone fails, once the ranks agree
            failures.add(slot.job_id, "optimizer", exc)
    elapsed = time.perf_counter() - started
    phases = {
        "forward": forward_s,
        "backward": backward_s,
        "gradient_sync": sync_done - backward_done,
        "optimizer": elapsed - (sync_done - started),
    }
    if not trained:
        if riders is not None:
            riders.finish(split_device_seconds(elapsed, ctx.world_size, riders.tokens()))
        return
    # Every job's loss, tokens and optimizer failure in one tensor: one all-reduce and one
    # sync for the metrics, and the ranks agree on who failed in the optimizer.
    # Each job's objective adds its own statistics, so rows differ in length.
    per_job = [
        torch.cat(
            [
                torch.stack(
                    [
                        losses[s.job_id].detach().float(),
                        tokens[s.job_id].float(),
                        torch.tensor(float(s.job_id in failures.caught), device=ctx.device),
                        right[s.job_id][0].float(),
                        right[s.job_id][1].float(),
                    ]
                ),
                stats[s.job_id].float(),
            ]
        )
        for s in trained
    ]
    totals = torch.cat(per_job)
    dist.all_reduce(totals)
    reduced = [row.tolist() for row in totals.split([len(row) for row in per_job])]
    flags = [row[2] for row in reduced]
    failed = {s.job_id for s in fail_agreed(failures, trained, flags, ctx.report, ctx.world_size)}
    pack_tokens = sum(row[1] for row in reduced)
    # Usage (core.usage): the step's time on every rank, split by each job's share of its
    # tokens (a job failed in the optimizer reports nothing: its share goes uncounted).
    # Tinker riders count by their tokens (every rank runs all of them: counted once).
    device_seconds = split_device_seconds(
        elapsed,
        ctx.world_size,
        {
            **{s.job_id: int(row[1]) for s, row in zip(trained, reduced, strict=True)},
            **(riders.tokens() if riders is not None else {}),
        },
    )
    if riders is not None:
        riders.finish(device_seconds)
    for slot, row in zip(trained, reduced, strict=True):
        loss_sum, slot_tokens, _, slot_right, counted, *stat_sums = row
        if slot.job_id in failed:
            continue
        norm = norms[slot.job_id]
        mean_loss = loss_sum / ctx.world_size
        slot.trained_tokens += int(slot_tokens)
        slot.last_loss = mean_loss
        slot.last_accuracy = slot_right / counted if counted else math.nan
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
                "train_mean_token_accuracy": slot.last_accuracy,
                "learning_rate": slot.learning_rate,
                "grad_norm": norm,
                "tokens_per_second": slot_tokens / elapsed,
                "pack_tokens_per_second": pack_tokens / elapsed,
                "pack_size": len(active),
                "step_seconds": elapsed,
                "phase_seconds": phases,
                "trained_tokens": slot.trained_tokens,
                "step_tokens": int(slot_tokens),
                "device_seconds": device_seconds[slot.job_id],
                # Means over the ranks' equal shares of pairs: the whole batch's means.
                **{
                    name: value / ctx.world_size
                    for name, value in zip(slot.objective.stat_names, stat_sums, strict=True)
                },
                **(
                    {"dtypes": _with_adam(first[slot.job_id], slot)} if slot.job_id in first else {}
                ),
            },
        )


def _group_forward(
    ctx: PackContext,
    group: list[JobSlot],
    width: int,
    failures: StepFailures,
    riders: StepRiders | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """One forward of a width group's rows (logits, labels and attention mask of the jobs'
    rows, rows per job), the riders of that width after them (logits only). A job whose
    slot math raises is caught in its packed layers (`Routing.failures`) and recorded."""
    shards = [slot.next_rows(ctx.rank, ctx.world_size) for slot in group]
    ctx.routing.blocks = [
        (slot.job_id, len(shard)) for slot, shard in zip(group, shards, strict=True)
    ]
    if group:
        batch = collate([e for shard in shards for e in shard], ctx.pad_token_id, width)
    else:  # Tinker riders of a width no job has this step
        empty = torch.zeros((0, width), dtype=torch.long)
        batch = {"input_ids": empty, "attention_mask": empty, "labels": empty}
    labels, job_mask = batch["labels"].to(ctx.device), batch["attention_mask"].to(ctx.device)
    if riders is not None and width in riders.widths():
        ids, mask, blocks = riders.rows(width)
        batch["input_ids"] = torch.cat([batch["input_ids"], ids])
        batch["attention_mask"] = torch.cat([batch["attention_mask"], mask])
        ctx.routing.blocks += blocks
    batch = {k: v.to(ctx.device) for k, v in batch.items()}
    ctx.routing.failures = {}
    ctx.routing.forward_id += 1
    for slot in group:
        try:
            failures.check(slot, "forward")
        except Exception as exc:  # noqa: BLE001 - a test's fault: raised inside the forward
            ctx.routing.injected[slot.job_id] = [exc, 1]  # raised in its second layer
    try:
        # The module itself, not the engine: the engine's forward/backward are built around
        # an optimizer it owns; ZeRO-3's gather/release hooks live on the module and run.
        logits = ctx.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    finally:
        ctx.routing.injected.clear()
    _record_failures(ctx, failures, riders, "forward")
    rows = [len(shard) for shard in shards]
    return logits, labels, job_mask, rows


def _record_failures(
    ctx: PackContext, failures: StepFailures, riders: StepRiders | None, phase: StepPhase
) -> None:
    """The slot math that raised in the last forward (or its recompute): a job's counts
    toward its failure; a Tinker model's fails its own request alone."""
    riding = {r.model_id for r in riders.riders} if riders is not None else set()
    for name, caught in (ctx.routing.failures or {}).items():
        if name in riding:
            assert riders is not None
            riders.fail(name, caught)
        else:
            failures.add(name, phase, caught)


def _reference_pass(
    ctx: PackContext, group: list[JobSlot], failures: StepFailures
) -> dict[str, torch.Tensor]:
    """The reference's summed log-probs of each DPO job's rows in a width group ([rows]
    per job), from one forward without gradient of those rows only, each job's block routed
    to its reference (the bare base, or its frozen start checkpoint). Every rank makes the
    same forwards (a collective under ZeRO-3): the groups and their members are the same."""
    members = [
        (slot, route) for slot in group if (route := slot.objective.reference_route) is not None
    ]
    if not members:
        return {}
    shards = [slot.next_rows(ctx.rank, ctx.world_size) for slot, _ in members]
    ctx.routing.blocks = [
        (route, len(shard)) for (_, route), shard in zip(members, shards, strict=True)
    ]
    batch = collate([e for shard in shards for e in shard], ctx.pad_token_id, width_of(group[0]))
    batch = {k: v.to(ctx.device) for k, v in batch.items()}
    ctx.routing.failures = {}
    ctx.routing.forward_id += 1
    logprobs = reference_logprobs(ctx.model, batch, ctx.loss_chunk_tokens)
    by_route = {route: slot.job_id for slot, route in members}
    for route, caught in ctx.routing.failures.items():  # a frozen reference slot's math
        failures.add(by_route.get(route, route), "forward", caught)
    rows = [len(shard) for shard in shards]
    return {
        slot.job_id: part for (slot, _), part in zip(members, logprobs.split(rows), strict=True)
    }


def _job_loss_grad(
    ctx: PackContext,
    slot: JobSlot,
    block: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    failures: StepFailures,
    losses: dict[str, torch.Tensor],
    stats: dict[str, torch.Tensor],
) -> torch.Tensor:
    """The job's own loss, its objective's (workers/host/objective.py: the mean next-token
    loss over its own tokens, or DPO's against its reference log-probs), chunked (no fp32 copy
    of the whole vocabulary's logits; the chunks are cut within the job's block, so its loss is
    the same packed as alone), with its statistics in `stats`; and its gradient with respect
    to the job's block of logits: the job's own part of backward, local to this rank. Zeros
    when the job failed."""
    logits, labels, reference = block
    phase: StepPhase = "loss"
    stats[slot.job_id] = torch.zeros(len(slot.objective.stat_names), device=logits.device)
    if slot.job_id not in failures.caught:
        try:
            failures.check(slot, phase)
            loss, stats[slot.job_id] = slot.objective.loss(
                logits, labels, reference, ctx.loss_chunk_tokens
            )
            losses[slot.job_id] = loss
            phase = "backward"
            failures.check(slot, phase)
            (grad,) = torch.autograd.grad(loss, logits)
            return grad
        except Exception as exc:  # noqa: BLE001 - this job alone fails, once the ranks agree
            failures.add(slot.job_id, phase, exc)
    losses.setdefault(slot.job_id, torch.zeros((), device=logits.device))
    return torch.zeros_like(logits)


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
    that jobs of similar lengths share a forward. A DPO pair's two rows both count."""
    longest = max(
        len(row.input_ids) for i in slot.batches[slot.step] for row in slot.examples[i].rows
    )
    return -(-longest // bucket) * bucket


def width_groups(active: list[JobSlot]) -> list[list[JobSlot]]:
    """Active slots grouped by width, narrowest first (a fixed order on every rank)."""
    groups: dict[int, list[JobSlot]] = {}
    for slot in active:
        groups.setdefault(width_of(slot), []).append(slot)
    return [groups[width] for width in sorted(groups)]
