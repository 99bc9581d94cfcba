"""One job's failure in a pack step stays its own (issue 17).

Where a job's failure can be told apart from the pack's, it is caught on the rank where it
happens: its data (its width, its rows and their collation: workers.host.step_rows), its
LoRA slot math in the shared forward (`Routing.failures`: its rows get no delta, the forward
goes on), its loss, its loss's backward to the logits, its metrics (token accuracy, dtypes)
and its optimizer step. The ranks then agree on who failed before the next collective that
depends on it: the flags ride in the gradient all-reduce (and, for what fails after it, in
the metrics all-reduce), so no rank ever waits in a collective the others skipped. Every
rank then drops the same jobs; the failing rank's error and traceback are gathered so rank
0 can report them.

A failure inside the shared part (the base's own layers, ZeRO-3's gathers, the backward
through the base) cannot be laid on one job: it fails the worker group, which restarts, and
the host lays repeated crashes on a job that never finished a step (workers.host.membership).
"""

from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from core.fault_injection import StepPhase, injected_fault
from workers.host.slot import JobSlot, SlotState

# Ray writes a worker's logging to its log files, where operators look for tracebacks.
logger = logging.getLogger("lorafleet.worker")
TRACEBACK_CHARS = 8000  # the tail of a traceback that goes into the job's event
# Where a job failed: a phase a test can inject a fault into, or its "data" (its width, rows
# or their collation: workers.host.step_rows) or its "metrics" (its token accuracy, dtypes).
FailurePhase = StepPhase | Literal["data", "metrics"]


@dataclass
class StepFailures:
    """The jobs that failed on this rank during one step: job id -> (phase, exception)."""

    rank: int
    faults: tuple[Any, ...] = ()  # HostSpec.test_faults: a test's injected faults
    caught: dict[str, tuple[FailurePhase, Exception]] = field(default_factory=dict)

    def add(self, job_id: str, phase: FailurePhase, exc: Exception) -> None:
        if job_id not in self.caught:
            logger.error(
                "job %s failed in its %s on rank %d: %s",
                job_id,
                phase,
                self.rank,
                exc,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
            self.caught[job_id] = (phase, exc)

    def check(self, slot: JobSlot, phase: StepPhase) -> None:
        """TEST HOOK: raises here if a test injected a fault for this job, step and phase;
        for "crash", this worker process dies instead."""
        fault = injected_fault(self.faults, slot.job_id, slot.step, phase, self.rank)
        if fault is not None and phase == "crash":
            logger.error("job %s: %s: this worker exits", slot.job_id, fault)
            os._exit(1)
        if fault is not None:
            raise fault

    def flags(self, slots: list[JobSlot], device: torch.device) -> torch.Tensor:
        """1.0 for each slot that failed on this rank, in the slots' (rank-wide) order."""
        return torch.tensor(
            [float(slot.job_id in self.caught) for slot in slots],
            dtype=torch.float32,
            device=device,
        )


def fail_agreed(
    failures: StepFailures,
    slots: list[JobSlot],
    summed_flags: list[float],
    report: Any,
    world_size: int,
) -> list[JobSlot]:
    """Marks failed every slot that some rank flagged (the same slots on every rank) and has
    rank 0 report each one's error and traceback, gathered from the first rank that caught
    it. A collective when anything failed; free when nothing did (no rank gathers)."""
    failed = [slot for slot, flag in zip(slots, summed_flags, strict=True) if flag > 0]
    if not failed:
        return []
    mine = {
        slot.job_id: _cause(failures, slot.job_id)
        for slot in failed
        if slot.job_id in failures.caught
    }
    gathered: list[Any] = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    for slot in failed:
        slot.state = SlotState.FAILED
        if slot.optimizer is not None:  # its gradients are of no use now
            slot.optimizer.zero_grad(set_to_none=True)
        cause = next(
            (per_rank[slot.job_id] for per_rank in gathered if slot.job_id in per_rank), None
        )
        if cause is None:  # never seen: a flag with no exception behind it
            cause = {
                "phase": "step",
                "rank": None,
                "error": "a worker failed this job",
                "traceback": "",
            }
        error = cause["error"]
        report(
            slot.job_id,
            "job_failed",
            f"Training failed in its {cause['phase']} at step {slot.step}: {error}"[:2000],
            {
                "error": error,
                "error_code": "training_error",
                "traceback": cause["traceback"],
                "phase": cause["phase"],
                "rank": cause["rank"],
                "step": slot.step,
            },
        )
    return failed


def _cause(failures: StepFailures, job_id: str) -> dict[str, Any]:
    phase, exc = failures.caught[job_id]
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {
        "phase": phase,
        "rank": failures.rank,
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": text[-TRACEBACK_CHARS:],
    }
