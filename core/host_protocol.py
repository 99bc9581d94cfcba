"""What the scheduler and a pack host say to each other: the shared types of issue 11.

A *pack host* keeps one base model loaded and partitioned on a long-lived group of workers
(one per base model and run shape) and trains whichever jobs it is given: a job joins at a
step boundary and leaves when it ends. The scheduler sees hosts only through `PackHosts`
(admit / release / poll / stop), implemented on Ray by `orchestrator.scheduling.ray_hosts.RayHosts`
(each host a detached, named actor `lorafleet-host-{host_id}`, `workers.host.pack_host`) and in
memory for the scheduler's unit tests.

Settings (`orchestrator.settings.Settings`, env `LORAFLEET_*`) that this protocol serves:
  - every job trains on a pack host; a `packing: false` job on an `exclusive` host of its
    own (one slot, no one else admitted, ending when its job leaves).
  - `host_idle_seconds`: a host with no job for this long ends and frees its workers.
  - `warm_hosts`: per base model, how many hosts stay up with no job (never idle-ended).
  - `step_timeout_seconds`: a host with jobs but no step for this long counts as hung.

Events: each job's events form one list on the host; each event carries `seq`, its index in
that list, and `data.time` (a float, wall-clock seconds) so sub-second latencies can be read.
`poll` takes, per job, the cursor (the next `seq` the caller wants) and returns the events
from there: a poll that sees a terminal state has also seen every event of that job.

Torch-free and Ray-free: imported by the API side, the scheduler and the workers alike.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, Protocol, TypedDict

from core.fault_injection import StepFault
from core.objectstore import ObjectStoreConfig
from core.run_states import STOP_ALL, RunJobState
from core.spec import JobSpec

HOST_PREFIX = "lorafleet-host-"
# A host's workers set up in these phases, each under `HostSpec.setup_timeout_seconds`.
SETUP_PHASES = ("distributed", "base_model", "deepspeed")
# Tinker requests of a model's move between hosts (workers.host.slot_moves): the ending host
# writes the model's state and frees its slot; the next host makes the slot from that state.
RELOCATE, RESTORE = "relocate", "restore"
# A host's notice that a Tinker model was lost with its workers (a restart): not a request's
# answer; the dispatcher restores the model from a current saved state, or fails it.
LOST = "lost"


def host_actor_name(host_id: str) -> str:
    return f"{HOST_PREFIX}{host_id}"


# A node group is a custom Ray resource of the nodes in it (`ray start --resources=
# '{"lorafleet-group:NAME": 1}'`); each worker of a host of a base placed there takes this
# much of it: a mark, not a capacity (what limits a group's hosts is its nodes' CPUs/GPUs).
NODE_GROUP_PREFIX = "lorafleet-group:"
NODE_GROUP_SHARE = 0.001


def node_group_resource(group: str) -> str:
    return f"{NODE_GROUP_PREFIX}{group}"


@dataclass(frozen=True)
class HostShape:
    """What jobs must share to train on the same host: the base and the run's shape."""

    base_model: str  # catalog name
    base_model_uri: str  # local folder or s3:// URI of the Hugging Face model + tokenizer
    num_workers: int
    use_gpu: bool
    precision: str  # "bf16" | "fp32"
    # The node group its workers must sit in (Settings.base_node_groups, by base: not part
    # of the key); None: any node.
    node_group: str | None = None

    @property
    def key(self) -> str:
        """A stable text form, for grouping hosts and jobs by shape."""
        gpu = "gpu" if self.use_gpu else "cpu"
        return f"{self.base_model}/{self.num_workers}x{gpu}/{self.precision}"


@dataclass(frozen=True)
class HostSpec:
    """Everything a host needs to start; frozen for the host's life (membership is not here)."""

    host_id: str
    shape: HostShape
    object_store: ObjectStoreConfig
    model_cache_dir: Path
    storage_path: Path  # Ray Train's run folder (shared across nodes)
    max_slots: int = 8  # jobs training at once
    idle_seconds: float = 60.0  # 0 with `warm`: never idle-ends
    warm: bool = False  # a warm host stays up with no job
    step_timeout_seconds: float = 600.0
    zero3_param_persistence_threshold: int = 100_000
    checkpoint_every_steps: int = 50
    checkpoint_keep_last: int = 3
    max_job_restarts: int = 2  # worker failures each job survives (per job, not per host)
    # Restarts because its workers' nodes were preempted that each job survives (their own
    # budget: a preemption spends no restart; workers.host.node_loss).
    max_job_preemptions: int = 10
    loss_chunk_tokens: int = 4096  # the loss's fp32 logits are made this many tokens at a time
    gradient_checkpointing: bool = False  # recompute the base's activations in backward
    # Weights & Biases' run folders (data_dir/wandb): where an offline run is written.
    wandb_dir: Path | None = None
    # A finished job's adapter waits this long for a store that is away before it fails.
    publish_retry_seconds: float = 600.0
    # Per setup phase of the workers (SETUP_PHASES); past it the host's jobs fail with
    # `setup_timeout`, naming the phase.
    setup_timeout_seconds: float = 600.0
    # Per rank: the base's shard + every running member's `AdmissionRequest.memory_bytes`
    # must stay within it, or the host refuses an admit ("over budget"). 0: no check.
    memory_budget_bytes: int = 0
    exclusive: bool = False  # admits at most one running member (a `packing: false` job)
    # TEST HOOK (core.fault_injection): faults injected into named jobs' steps. Only tests
    # set it; the scheduler never does, and no field of the public API reaches it.
    test_faults: tuple[StepFault, ...] = ()


@dataclass(frozen=True)
class AdmissionRequest:
    """A job the scheduler asks a host to take. `job.attempt` fences stale reports."""

    job: JobSpec
    priority: int = 0
    memory_bytes: int = 0  # the scheduler's estimate of what the job adds per rank
    max_runtime_seconds: float | None = None
    # Preemptions the job has spent already (`max_job_preemptions` is one budget for its
    # life: the host counts on from here, and its reports' count is stored).
    preemptions: int = 0

    @property
    def job_id(self) -> str:
        return self.job.job_id

    @property
    def attempt(self) -> int:
        return self.job.attempt


@dataclass(frozen=True)
class AdmissionResult:
    admitted: bool
    # Why not, in words: "full", "ending", "already admitted", "shape mismatch", …, or
    # NO_ANSWER: the call timed out, so the host may yet take the job.
    reason: str | None = None


NO_ANSWER = "no answer"


@dataclass(frozen=True)
class Unanswered:
    """A host that has not answered a poll (a stalled or cut-off node, a stopped process):
    the poll sent at `since` (wall-clock seconds) is still outstanding."""

    since: float


class HostEvent(TypedDict):
    seq: int  # index in the job's own event list on the host
    type: str  # "message" | "metrics" | "checkpoint" | "published" | "job_failed" | …
    message: str
    data: dict[str, Any] | None  # always holds "time" (float seconds since the epoch)


class JobReport(TypedDict):
    attempt: int
    state: RunJobState
    events: list[HostEvent]
    cursor: int  # the next seq to ask for
    error: str | None  # handed_back: not an error but why ("Paused at step 12")
    error_code: str | None  # "training_error" | "infrastructure" | "timeout" | "invalid_file"


class HostMemory(TypedDict):
    base_bytes_per_rank: int  # the base's shard held by each rank (largest rank)
    # The second step of the latest membership, largest rank (workers.host.memory): measured
    # live tensor bytes (CPU) or the allocator's peak (GPU), and admission's estimate for
    # the same jobs (core.memory_estimate).
    peak_bytes_per_rank: int
    estimate_bytes_per_rank: NotRequired[int]
    members: NotRequired[list[str]]  # the job ids of that membership
    slot_bytes: dict[str, int]  # job id -> its LoRA weights, grads and Adam moments
    lora_bytes_held: int  # LoRA factors really held by the model now (0 once all left)


class RequestModel(TypedDict):
    """A Tinker model held on a host (issue 21), as admission counts it beside the jobs
    (core.tinker_memory): its LoRA factors, grads and AdamW state, and its forward work."""

    lora: dict[str, Any]  # as created: rank, train_mlp, train_attn, train_unembed
    rows: int  # its largest forward work so far: rows (0: none yet) ...
    width: int  # ... and its longest datum's tokens


class NodeRef(TypedDict):
    node_id: str  # Ray's node id (hex)
    ip: str


class HostReport(TypedDict):
    host_id: str
    shape: HostShape
    alive: bool  # False once the host has ended (idle, stopped or failed)
    # Its spec's `warm`: kept up with no job. The host says so itself, so a restarted
    # scheduler that adopts it counts it as warm capacity (and starts no second one).
    warm: bool
    exclusive: NotRequired[bool]  # its spec's `exclusive`: admits no one else, ever
    ending: bool  # no longer admits (idle timeout reached or stop requested)
    draining: NotRequired[str | None]  # why it drains (hands every job back), if it does
    step: int  # host steps so far (all jobs)
    last_step_at: float | None  # wall-clock time of the last step
    started_at: float
    slots_in_use: int
    # Of those, jobs done training whose adapter is being published (it may wait a while
    # for an object store that is away): no step is owed for them.
    publishing: NotRequired[int]
    max_slots: int
    worker_pids: list[int]  # per rank, gathered by rank 0
    worker_nodes: NotRequired[list[NodeRef]]  # per rank, beside its pid: where it runs
    node: NotRequired[NodeRef]  # the host actor's node (and its Ray Train controller's)
    worker_starts: int  # how many times the worker group (re)started
    memory: HostMemory
    jobs: dict[str, JobReport]  # every job admitted and not yet released
    # Its Tinker models (live, or with work queued: their creation among it), by model id.
    request_models: NotRequired[dict[str, RequestModel]]


class PackHosts(Protocol):
    """The scheduler's view of pack hosts; every call is cheap (no training on the caller)."""

    def list_hosts(self) -> list[str]:
        """Host ids alive now (a restarted scheduler adopts them)."""
        ...

    def start_host(self, spec: HostSpec) -> None:
        """Starts a host (its workers load the base); returns once the host accepts `admit`."""
        ...

    def admit(self, host_id: str, request: AdmissionRequest) -> AdmissionResult:
        """Asks the host to take a job at its next step boundary. The host arbitrates: a job
        already on it, a full or ending host answers `admitted=False` (no double admit)."""
        ...

    def release(self, host_id: str, job_id: str) -> None:
        """Forgets a job whose terminal state the scheduler has stored (frees its record)."""
        ...

    def poll(self, host_id: str, cursors: dict[str, int]) -> HostReport | None:
        """One call per host: its figures and each job's state and events from its cursor
        (jobs absent from `cursors` start at 0). None if the host no longer exists."""
        ...

    def poll_all(
        self, cursors: dict[str, dict[str, int]]
    ) -> dict[str, HostReport | Unanswered | None]:
        """`poll` of every host in `cursors` at once, never raising and never waiting longer
        than the poll timeout in all: a host that does not answer in time is `Unanswered`
        (its poll stays outstanding, and is not sent again until it answers)."""
        ...

    def wait_for_news(self, timeout: float) -> bool:
        """Waits at most `timeout` for news from any host since the last call: a job's first
        step, any event but metrics, a host that ended. True: the scheduler should poll now
        (its tick) rather than at its interval. Called from one thread of its own."""
        ...

    def stop(self, host_id: str, job_id: str = STOP_ALL) -> None:
        """Cancels a job at the next step boundary; `STOP_ALL` ends the host (jobs cancelled)."""
        ...

    def fence(self, host_id: str, job_id: str, attempt: int) -> None:
        """Says `attempt` is the job's current attempt: an older attempt of it on the host is
        cancelled and leaves the workers at its next step boundary (its late events are
        dropped). Admitting a newer attempt fences the older one the same way."""
        ...

    def hand_back(self, host_id: str, job_id: str, why: str) -> None:
        """Checkpoints a job at its next step boundary and gives it back (a pause): its state
        becomes `handed_back`, its slot is free, and it continues from that step elsewhere
        without spending an attempt. `why` begins its event ("Paused by …")."""
        ...

    def drain(self, host_id: str, why: str) -> None:
        """The host admits nothing more and hands back every job (as `hand_back`), then ends:
        how a host's node is emptied for an upgrade or a removal."""
        ...

    def kill(self, host_id: str) -> None:
        """Ends a host now (hung or unwanted); its unfinished jobs fail with `infrastructure`."""
        ...

    def reap(self) -> list[str]:
        """Removes the hosts that have ended (idle, stopped or failed); returns their ids."""
        ...

    def free_resources(self) -> list[dict[str, float]]:
        """Resources free now on each node that takes new work ({"CPU": …, "GPU": …}): a
        new host is started only if its workers' bundles fit
        (orchestrator.scheduling.placement), else its job waits."""
        ...

    def draining_nodes(self) -> dict[str, str]:
        """The nodes being drained now (Ray's own drain, or `lorafleet hosts drain NODE`):
        node id -> IP. A host with a rank there is drained (hands its jobs back)."""
        ...

    def preempted_nodes(self, node_ids: Collection[str]) -> dict[str, str]:
        """Of `node_ids`, those the cluster lists as dead because they were preempted (a
        drain ended them: Ray's with a deadline, the autoscaler's, a spot notice): node id
        -> the cluster's words for it. A host lost with its preempted node costs its jobs a
        preemption, not an attempt (orchestrator/scheduling/host_watch.py)."""
        ...

    def request_resources(self, bundles: list[dict[str, float]]) -> None:
        """Asks the cluster's autoscaler to grow until `bundles` fit (the whole cluster's
        want, replacing the last request); an empty list withdraws it."""
        ...


__all__ = [
    "HOST_PREFIX",
    "STOP_ALL",
    "AdmissionRequest",
    "AdmissionResult",
    "HostEvent",
    "HostMemory",
    "HostReport",
    "HostShape",
    "HostSpec",
    "JobReport",
    "NO_ANSWER",
    "PackHosts",
    "RequestModel",
    "SETUP_PHASES",
    "Unanswered",
    "host_actor_name",
]
