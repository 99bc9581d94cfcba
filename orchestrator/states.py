"""The job state machine: one transition table, and the rules read from it (pure).

Public statuses are OpenAI's; `cancelling` is ours: a running job asked to stop whose run
has not stopped yet. `running → queued` is the infrastructure-failure path (the job runs
again, with a new attempt number), and the hand-back of a drained host's jobs (checkpointed
at a step boundary, the attempt given back). `running → pausing → paused` is OpenAI's pause:
the job is checkpointed at its next step boundary and its slot freed, spending no attempt;
`paused → queued` resumes it from that checkpoint.
"""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    PAUSING = "pausing"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return not TRANSITIONS[self]


S = JobStatus
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.VALIDATING_FILES: frozenset({S.QUEUED, S.FAILED, S.CANCELLED}),
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED, S.FAILED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLING, S.QUEUED, S.PAUSING}),
    S.CANCELLING: frozenset({S.CANCELLED, S.SUCCEEDED, S.FAILED}),
    # A job that ends (or fails) before its next step boundary ends as it would have.
    S.PAUSING: frozenset({S.PAUSED, S.SUCCEEDED, S.FAILED, S.CANCELLING}),
    S.PAUSED: frozenset({S.QUEUED, S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
del S

# Statuses whose job is on a pack host (the scheduler polls it there).
ACTIVE_RUN_STATUSES = (JobStatus.RUNNING, JobStatus.CANCELLING, JobStatus.PAUSING)


def sources_of(target: JobStatus) -> tuple[JobStatus, ...]:
    """Every status a job may be in to move to `target` (the guard of its UPDATE)."""
    return tuple(s for s, targets in TRANSITIONS.items() if target in targets)


def is_allowed(source: JobStatus, target: JobStatus) -> bool:
    return target in TRANSITIONS[source]


def mermaid_diagram() -> str:
    """The state diagram in the README, generated from the table so the two never disagree."""
    lines = ["stateDiagram-v2", "    [*] --> validating_files"]
    for source, targets in TRANSITIONS.items():
        for target in sorted(targets, key=lambda s: list(JobStatus).index(s)):
            lines.append(f"    {source.value} --> {target.value}")
        if not targets:
            lines.append(f"    {source.value} --> [*]")
    return "\n".join(lines)
