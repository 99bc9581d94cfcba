"""A job's state on its pack host, as the host reports it to the scheduler.

Same terminal rule as `orchestrator.states.JobStatus`: a state with no way out is terminal,
and a host never moves a job out of a terminal state (late events for it are refused).
"""

from __future__ import annotations

from enum import Enum

NAMESPACE = "lorafleet"  # the Ray namespace of every lorafleet actor
STOP_ALL = "*"


class RunJobState(str, Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return not RUN_TRANSITIONS[self]


S = RunJobState
RUN_TRANSITIONS: dict[RunJobState, frozenset[RunJobState]] = {
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
del S
