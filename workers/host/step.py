"""One training step of a pack: every active job's rows through the shared base at once.

Free functions over an explicit `PackContext` (model, routing, rank, world size, how to
report), called by each worker of a pack host (`workers.host.worker_loop`) and by tests.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.fault_injection import StepFault, StepPhase
from core.usage import split_device_seconds
from workers.host.failures import StepFailures, fail_agreed
from workers.host.objective import reference_logprobs
from workers.host.recompute import use_gradient_checkpointing  # noqa: F401 - importers' path
from workers.host.slot import JobSlot, SlotState
from workers.host.step_metrics import (
    dtypes_of,
    job_accuracy,
    metrics_data,
    summed_totals,
    with_adam,
)
from workers.host.step_riders import StepRiders
from workers.host.step_rows import (  # noqa: F401 - WIDTH_BUCKET, width_of: importers' path
    WIDTH_BUCKET,
    Batch,
    groups_by_width,
    job_batches,
    joined,
    placeholder,
    width_of,
)
from workers.lora.packed_layer import Routing
from workers.training.chunked_loss import DEFAULT_CHUNK_TOKENS
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

    A job whose own part of the step raises (its width, rows or their collation, its slot
    math, loss, loss backward, token accuracy, dtypes or optimizer step) fails alone
    (workers.host.failures): its rows get no delta and no gradient, every rank still makes
    the same collectives, and the others' numbers are those of a step
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
    by_width = groups_by_width(active, failures)
    rider_widths = riders.widths() if riders is not None else set()
    for width in sorted(set(by_width) | rider_widths):
        group = by_width.get(width, [])
        group_started = time.perf_counter()
        batches = job_batches(group, width, ctx.pad_token_id, ctx.rank, ctx.world_size, failures)
        reference = _reference_pass(ctx, group, batches, width, failures)
        members, logits, labels, mask, rows = _group_forward(
            ctx, group, batches, width, failures, riders
        )
        forward_done = time.perf_counter()
        grads = []
        job_logits_all = logits[: sum(rows)]
        for slot, job_logits, job_labels, job_mask in zip(
            members, job_logits_all.split(rows), labels.split(rows), mask.split(rows), strict=True
        ):
            if slot.job_id not in failures.caught:
                block = (job_logits, job_labels, job_mask)
                job_accuracy(slot, block, ctx.loss_chunk_tokens, failures, tokens, right)
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
    first: dict[str, dict[str, str]] = {}
    for slot in trained:
        if slot.step == 0:
            try:
                first[slot.job_id] = dtypes_of(ctx.model, slot, losses[slot.job_id])
            except Exception as exc:  # noqa: BLE001 - this job alone fails, once the ranks agree
                failures.add(slot.job_id, "metrics", exc)
    norms = {}
    for slot in trained:
        if slot.job_id in failures.caught:  # its dtypes: it takes no step (failed, agreed below)
            continue
        try:
            failures.check(slot, "optimizer")
            norms[slot.job_id] = slot.apply_gradients()
        except Exception as exc:  # noqa: BLE001 - this job alone fails, once the ranks agree
            failures.add(slot.job_id, "optimizer", exc)
            continue
        try:
            if slot.job_id in first:  # Adam's state is there once it stepped
                first[slot.job_id] = with_adam(first[slot.job_id], slot)
        except Exception as exc:  # noqa: BLE001 - this job alone fails, once the ranks agree
            failures.add(slot.job_id, "metrics", exc)
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
    # Every job's loss, tokens, accuracy, statistics and failure since the gradient sync:
    # one all-reduce for the metrics, and the ranks agree on who failed after the sync.
    reduced = summed_totals(trained, failures, ctx.device, losses, tokens, right, stats)
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
        loss_sum, slot_tokens, _, slot_right, counted = row[:5]
        if slot.job_id in failed:
            continue
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
        try:  # from the ranks' sums and state the same on every rank: it fails on all alike
            data = metrics_data(
                slot,
                row,
                world_size=ctx.world_size,
                norm=norms[slot.job_id],
                timing=(elapsed, phases),
                pack=(pack_tokens, len(active)),
                device_seconds=device_seconds[slot.job_id],
                dtypes=first.get(slot.job_id),
            )
        except Exception as exc:  # noqa: BLE001 - this job alone fails
            fail_slot(ctx, slot, exc)
            continue
        message = f"Step {slot.step}/{slot.total_steps}: training loss={mean_loss:.4f}"
        ctx.report(slot.job_id, "metrics", message, data)


def _group_forward(
    ctx: PackContext,
    group: list[JobSlot],
    batches: dict[str, Batch],
    width: int,
    failures: StepFailures,
    riders: StepRiders | None,
) -> tuple[list[JobSlot], torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """One forward of a width group's rows: (the jobs whose rows it holds, the logits, labels
    and attention mask of those rows, rows per job), the riders of that width after them
    (logits only). A job whose rows failed (no batch) is left out; one whose slot math
    raises is caught in its packed layers (`Routing.failures`) and recorded."""
    members = [slot for slot in group if slot.job_id in batches]
    parts = [batches[slot.job_id] for slot in members]
    riding = riders is not None and width in riders.widths()
    if group and not members and not riding:  # every job failed here; the ranks still meet
        members, parts = group[:1], [placeholder(width, ctx.pad_token_id)]
    ctx.routing.blocks = [
        (slot.job_id, len(part["input_ids"])) for slot, part in zip(members, parts, strict=True)
    ]
    if parts:
        batch = joined(parts)
    else:  # Tinker riders of a width no job has this step
        empty = torch.zeros((0, width), dtype=torch.long)
        batch = {"input_ids": empty, "attention_mask": empty, "labels": empty}
    labels, job_mask = batch["labels"].to(ctx.device), batch["attention_mask"].to(ctx.device)
    if riders is not None and riding:
        ids, mask, blocks = riders.rows(width)
        batch["input_ids"] = torch.cat([batch["input_ids"], ids])
        batch["attention_mask"] = torch.cat([batch["attention_mask"], mask])
        ctx.routing.blocks += blocks
    batch = {k: v.to(ctx.device) for k, v in batch.items()}
    ctx.routing.failures = {}
    ctx.routing.forward_id += 1
    for slot in members:
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
    rows = [len(part["input_ids"]) for part in parts]
    return members, logits, labels, job_mask, rows


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
    ctx: PackContext,
    group: list[JobSlot],
    batches: dict[str, Batch],
    width: int,
    failures: StepFailures,
) -> dict[str, torch.Tensor]:
    """The reference's summed log-probs of each DPO job's rows in a width group ([rows]
    per job), from one forward without gradient of those rows only, each job's block routed
    to its reference (the bare base, or its frozen start checkpoint). Every rank makes the
    same forwards (a collective under ZeRO-3): the groups and their DPO jobs are the same,
    whatever failed (a placeholder row when every one failed here)."""
    dpo = [(slot, route) for slot in group if (route := slot.objective.reference_route) is not None]
    if not dpo:
        return {}
    members = [(slot, route) for slot, route in dpo if slot.job_id in batches]
    parts = [batches[slot.job_id] for slot, _ in members]
    if not members:
        members, parts = dpo[:1], [placeholder(width, ctx.pad_token_id)]
    ctx.routing.blocks = [
        (route, len(part["input_ids"])) for (_, route), part in zip(members, parts, strict=True)
    ]
    batch = {k: v.to(ctx.device) for k, v in joined(parts).items()}
    ctx.routing.failures = {}
    ctx.routing.forward_id += 1
    logprobs = reference_logprobs(ctx.model, batch, ctx.loss_chunk_tokens)
    by_route = {route: slot.job_id for slot, route in members}
    for route, caught in ctx.routing.failures.items():  # a frozen reference slot's math
        failures.add(by_route.get(route, route), "forward", caught)
    rows = [len(part["input_ids"]) for part in parts]
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
            loss, job_stats = slot.objective.loss(logits, labels, reference, ctx.loss_chunk_tokens)
            if job_stats.shape != stats[slot.job_id].shape:  # the metrics all-reduce's layout
                raise ValueError(f"its objective gave {tuple(job_stats.shape)} statistics")
            stats[slot.job_id] = job_stats
            losses[slot.job_id] = loss
            phase = "backward"
            failures.check(slot, phase)
            (grad,) = torch.autograd.grad(loss, logits)
            return grad
        except Exception as exc:  # noqa: BLE001 - this job alone fails, once the ranks agree
            failures.add(slot.job_id, phase, exc)
    losses.setdefault(slot.job_id, torch.zeros((), device=logits.device))
    return torch.zeros_like(logits)
