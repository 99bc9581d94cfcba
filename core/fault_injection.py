"""TEST HOOK, off unless a test turns it on: faults a test injects into a pack host's step to
show that one job's failure stays its own (issue 17).

A test builds its `HostSpec` with `test_faults=(StepFault(...),)`; nothing else sets that
field (the scheduler never does, and no field of the public API reaches it), so in
production the tuple is empty and `injected_fault` always answers None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The per-job parts of a pack step where a job's own failure is caught: its LoRA slot math in
# the shared forward, its loss, its loss's backward to the logits, its optimizer step. And
# "crash": the worker process dies as the job's step starts (a worker crash, not a failure
# the step can catch: the worker group restarts).
StepPhase = Literal["forward", "loss", "backward", "optimizer", "crash"]
STEP_PHASES: tuple[StepPhase, ...] = ("forward", "loss", "backward", "optimizer", "crash")


@dataclass(frozen=True)
class StepFault:
    """Makes job `job_id` raise `InjectedFault` in `phase` of its own step `step` (0-based:
    the step that would produce its metrics event for step `step + 1`), on `ranks` (None:
    every rank)."""

    job_id: str
    step: int
    phase: StepPhase
    ranks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.phase not in STEP_PHASES:
            raise ValueError(f"phase must be one of {STEP_PHASES}, not {self.phase!r}")


class InjectedFault(RuntimeError):
    """The exception a `StepFault` raises (a test's, never a real failure)."""


def injected_fault(
    faults: tuple[StepFault, ...], job_id: str, step: int, phase: StepPhase, rank: int
) -> InjectedFault | None:
    """The exception to raise for this job, step, phase and rank, if a test asked for one."""
    for fault in faults:
        if (fault.job_id, fault.step, fault.phase) != (job_id, step, phase):
            continue
        if fault.ranks is None or rank in fault.ranks:
            return InjectedFault(f"injected {phase} fault at step {step} on rank {rank}")
    return None
