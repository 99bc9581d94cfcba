"""A job's state on its pack host, as the host reports it to the scheduler: running, or one
of four ends (the host never moves a job out of an end; late events for it are dropped).
`handed_back`: checkpointed at a step boundary and given back, not finished (a pause or a
drain): the job continues elsewhere from that checkpoint, its attempt not spent.
The scheduler maps an end to the job's status in one place
(`orchestrator.scheduling.outcomes.JobOutcomes.settle`).
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
    HANDED_BACK = "handed_back"
