"""A pack host's memory per membership: the measured peak per rank of the second step after
each join or leave, beside the estimate admission uses for the same jobs
(core.memory_estimate), so a user can read how well admission's figure holds.

Measured once per membership: on a GPU the allocator's own peak (reset at the change, free
to read); on a CPU the live tensor bytes of that step (workers.runtime.live_tensor_bytes; a
dispatch mode, too slow for every step). The ranks take the largest figure (one all-reduce,
only on those steps), as admission's budget is per rank.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from core.base_catalog import local_base_shape
from core.host_protocol import HostSpec
from core.memory_estimate import (
    MemoryEstimate,
    estimate_rank_bytes,
    host_run_shape,
    slot_demand,
)
from core.spec import JobSpec
from workers.host.slot import JobSlot
from workers.host.step import PackContext, train_step
from workers.host.step_riders import StepRiders
from workers.runtime.live_tensor_bytes import LiveTensorBytes, held_tensors


def estimate_for(
    spec: HostSpec, base_path: Path, jobs: list[JobSpec], rows: Sequence[int] = ()
) -> MemoryEstimate:
    """Admission's estimate (orchestrator.scheduling.sizing) for these jobs on this host;
    `rows`: each job's tokenized rows (its dataset term)."""
    base = _base_shape(base_path)
    shape = spec.shape
    run = host_run_shape(
        num_workers=shape.num_workers,
        precision=shape.precision,
        gradient_checkpointing=spec.gradient_checkpointing,
        loss_chunk_tokens=spec.loss_chunk_tokens,
        persistence_threshold=spec.zero3_param_persistence_threshold,
        use_gpu=shape.use_gpu,
    )
    demands = [
        slot_demand(
            # A DPO pair is two rows (its reference's forward keeps nothing for backward).
            batch_size=job.training.batch_size * job.training.rows_per_example,
            num_workers=shape.num_workers,
            max_seq_len=job.training.max_seq_len,
            lora_r=job.lora.r,
            target_modules=job.lora.target_modules,
            lora_dropout=job.lora.dropout,
            dataset_rows=(rows[index] if index < len(rows) else 0) * job.training.rows_per_example,
        )
        for index, job in enumerate(jobs)
    ]
    return estimate_rank_bytes(base, run, demands)


@cache
def _base_shape(base_path: Path) -> Any:
    return local_base_shape(base_path)


# Rows of a job whose objects are counted one by one; a larger dataset is sampled evenly and
# scaled (counting every token of a million rows would stall the step it measures).
DATASET_SAMPLE_ROWS = 256


def held_dataset_bytes(slots: Sequence[JobSlot]) -> int:
    """What the jobs' tokenized rows take on this rank, as CPython holds them (lists of
    ints, each int object counted once; the small ints CPython shares cost nothing)."""
    total = 0
    for slot in slots:
        rows = slot.examples
        step = max(1, len(rows) // DATASET_SAMPLE_ROWS)
        sample = rows[::step]
        seen: set[int] = set()
        counted = 0
        for example in (row for e in sample for row in e.rows):  # a DPO pair holds two
            counted += sys.getsizeof(example)
            for ids in (example.input_ids, example.labels):
                counted += sys.getsizeof(ids)
                for value in ids:
                    if not -5 <= value <= 256 and id(value) not in seen:
                        seen.add(id(value))
                        counted += sys.getsizeof(value)
        total += counted * len(rows) // max(1, len(sample))
    return total


# The second step of a membership is measured: in the first, a new job's Adam moments are
# made only after the step's peak, and ZeRO-3 prefetches parameters only once it has traced
# a step (seen: the first step of a host peaked 13% below its later steps).
MEASURED_STEP = 2


class MembershipMemory:
    """Measures the second step of each new set of live jobs (the same on every rank: the
    live slots are, or the step's collectives would not match)."""

    def __init__(self, spec: HostSpec, base_path: Path, ctx: PackContext) -> None:
        self.spec, self.base_path, self.ctx = spec, base_path, ctx
        self.members: tuple[str, ...] = ()
        self.steps = 0  # steps of this membership so far
        self.latest: dict[str, Any] = {}  # the last membership's figures, for the status

    def step(
        self, active: list[JobSlot], riders: StepRiders | None = None
    ) -> dict[str, Any] | None:
        """Trains one step; returns the figures when it was measured (a membership's second)."""
        members = tuple(slot.job_id for slot in active)
        device = self.ctx.device
        if members != self.members:
            self.members, self.steps = members, 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        self.steps += 1
        if self.steps != MEASURED_STEP:
            train_step(self.ctx, active, riders)
            return None
        if device.type == "cuda":
            method = "cuda max_memory_allocated"
            train_step(self.ctx, active, riders)
            local = torch.cuda.max_memory_allocated(device)
        else:
            tracker = LiveTensorBytes(device.type)
            optimizers = [s.optimizer for s in active if s.optimizer is not None]
            tracker.hold(held_tensors(self.ctx.model, optimizers))
            with tracker:
                train_step(self.ctx, active, riders)
            # The tokenized rows are held beside the tensors (the estimate's dataset term;
            # on a GPU they sit in the node's memory, not the device's, so not counted there).
            method = "live tensor bytes + tokenized rows"
            local = tracker.peak + held_dataset_bytes(active)
        peak = torch.tensor([float(local)], dtype=torch.float64, device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        estimate = estimate_for(
            self.spec, self.base_path, [s.spec for s in active], [len(s.examples) for s in active]
        )
        measured = int(peak.item())
        self.latest = {
            "members": list(members),
            "measured_peak_bytes": measured,
            "estimate_bytes": estimate.total,
            "estimate_parts": estimate.parts,
            "ratio": measured / estimate.total if estimate.total else None,
            "method": method,
        }
        return self.latest
