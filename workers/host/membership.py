"""A pack host's membership rules, pure: who is on the host, who joins or leaves the workers
at the next step boundary, what each job's events and state are, and who pays for a worker
restart. No Ray, no torch, no clock of its own (one is passed in).

The real host (`workers.host.pack_host.PackHost`, a Ray actor) wraps one `Membership` in a
lock; the scheduler's in-memory fake of the host protocol (`tests/fakes/in_memory_hosts.py`)
wraps another, so the scheduler's unit tests see the host's own rules, not a copy of them.

Admission (`admit`), in this order: a job already here at this attempt or a newer one is
refused ("already admitted"); an ending host refuses ("ending"); another base ("shape
mismatch"); an exclusive host with a running member, or one at `max_slots` ("full"); past the
memory budget ("over budget"). A newer attempt of a job still here replaces the stale one:
the stale attempt leaves the workers first (it is *retiring*), then the new one is announced.

Fencing (`fence`): the scheduler says which attempt of a job is current; an older attempt
still on the host is dropped at its next boundary (cancelled, its events say why).

Hand-back (`hand_back`, `drain`: `workers.host.hand_back`): a member is checkpointed at its
next step boundary and leaves (a pause, a drain); its job ends here as *handed back*.

Worker restarts (`begin_attempt`: `workers.host.restarts`): every member the dead workers
held is announced again and resumes from its own checkpoint; each spends one restart of its
own budget. A crash that comes while some members have never finished a step on this host
(they just joined) is laid on those members alone, and a member so implicated twice fails
alone ("training_error"), so a job that crashes the workers as it joins cannot use up its
mates' budgets. A restart because nodes were preempted (Ray's drain, a spot notice:
`workers.host.node_loss`) spends each held member's preemption budget instead, never its
restarts; one that Ray names only later is amended then (`explain_restart`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.host_protocol import AdmissionRequest, AdmissionResult, HostSpec, JobReport
from core.run_states import STOP_ALL, RunJobState
from core.spec import JobSpec
from workers.host.hand_back import HandBacks
from workers.host.node_loss import LostNode, NodeLosses
from workers.host.restarts import WorkerRestarts

RUNNING, SUCCEEDED, FAILED, CANCELLED, HANDED_BACK = (
    RunJobState.RUNNING,
    RunJobState.SUCCEEDED,
    RunJobState.FAILED,
    RunJobState.CANCELLED,
    RunJobState.HANDED_BACK,
)
# Events from the workers that end one job.
JOB_ENDINGS = {
    "published": SUCCEEDED,
    "job_failed": FAILED,
    "job_cancelled": CANCELLED,
    "handed_back": HANDED_BACK,
}


@dataclass
class Member:
    """One admitted job, as the host keeps it until the scheduler releases it."""

    request: AdmissionRequest
    admitted_at: float
    state: RunJobState = RUNNING
    events: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    error_code: str | None = None
    announced: bool = False  # handed to the current worker group
    stopping: bool = False  # announced; the workers drop it at the next boundary
    restarts: int = 0  # worker restarts charged to this job
    preemptions: int = 0  # restarts because its workers' nodes were preempted
    implicated_crashes: int = 0  # crashes that came before it finished a step here
    steps_done: int = 0  # steps it finished on this host (its metrics events)
    timed_out: bool = False
    # Why it is handed back at its next boundary (a pause, a drain); None: it is not.
    hand_back: str | None = None

    @property
    def job_id(self) -> str:
        return self.request.job_id

    @property
    def attempt(self) -> int:
        return self.request.attempt


class Membership(HandBacks, NodeLosses, WorkerRestarts):
    """The rules of one host's membership. Not thread-safe: the caller holds its lock."""

    def __init__(self, spec: HostSpec, clock: Callable[[], float]) -> None:
        self.spec = spec
        self.clock = clock
        self.members: dict[str, Member] = {}
        self._lost_nodes: list[LostNode] = []  # dead nodes behind the last workers' restart
        # Job id -> (attempt, charged a restart), of the members the last restart held.
        self.last_restart_held: dict[str, tuple[int, bool]] = {}
        # Job id -> a stale attempt still on the workers: leaves before the new one joins.
        self.retiring: dict[str, int] = {}
        self.ending = False  # admits nothing more; the workers leave once no job is on
        self.draining: str | None = None  # why the host drains (it admits nothing more)
        self.alive = True
        # Idle time counts from the first step boundary: a host still loading its base is
        # starting, not idle (on a loaded machine that can take longer than idle_seconds).
        self.idle_since: float | None = None
        self.worker_starts = 0
        self.restarts_without_step = 0
        self.step = 0
        self.last_step_at: float | None = None
        self.base_bytes_per_rank = 0  # the workers' report; 0 until they loaded the base
        self.publishing = 0  # running members done training, their adapter being written

    # ---- bookkeeping ----------------------------------------------------------------------
    def running(self) -> list[Member]:
        return [m for m in self.members.values() if m.state is RUNNING]

    def append(
        self, member: Member, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        data = dict(data or {})
        data.setdefault("time", self.clock())
        member.events.append(
            {"seq": len(member.events), "type": kind, "message": message, "data": data}
        )

    def end(
        self, member: Member, state: RunJobState, error: str | None = None, code: str | None = None
    ) -> None:
        member.state, member.stopping = state, False
        if state is FAILED:
            member.error, member.error_code = error, code or "training_error"

    def fail(self, member: Member, error: str, code: str, **data: Any) -> None:
        """Fails a running member here (not through its workers' events)."""
        self.append(
            member,
            "job_failed",
            f"Training failed: {error}"[:2000],
            {"error": error, "error_code": code, **data},
        )
        self.end(member, FAILED, error, code)

    def end_unfinished(self, error: str, code: str, **data: Any) -> None:
        """The host ended (its workers gave up): every unfinished job fails with `code`."""
        for member in self.running():
            self.append(member, "message", f"Training failed: {error}"[:2000], data or None)
            self.end(member, FAILED, error, code)

    # ---- the scheduler's calls ------------------------------------------------------------
    def admit(self, request: AdmissionRequest) -> AdmissionResult:
        """Takes a job at the next step boundary, or says why not (module docstring)."""
        known = self.members.get(request.job_id)
        # A job handed back here gave its attempt back: the same attempt may come again.
        again = (
            known is not None and known.state is HANDED_BACK and known.attempt == request.attempt
        )
        if known is not None and known.attempt >= request.attempt and not again:
            return AdmissionResult(False, "already admitted")
        if self.draining is not None:
            return AdmissionResult(False, "draining")
        if self.ending or not self.alive:
            return AdmissionResult(False, "ending")
        if request.job.base_model_uri != self.spec.shape.base_model_uri:
            return AdmissionResult(False, "shape mismatch")
        running = [m for m in self.running() if m.job_id != request.job_id]
        if len(running) >= (1 if self.spec.exclusive else self.spec.max_slots):
            return AdmissionResult(False, "full")
        if self._over_budget(running, request):
            return AdmissionResult(False, "over budget")
        if known is not None:
            self._retire(known, f"attempt {request.attempt} replaces it")
        member = Member(request, admitted_at=self.clock(), preemptions=request.preemptions)
        self.members[request.job_id] = member
        self.idle_since = None
        self.append(member, "message", f"Admitted to pack host {self.spec.host_id}")
        return AdmissionResult(True)

    def _over_budget(self, running: list[Member], request: AdmissionRequest) -> bool:
        budget = self.spec.memory_budget_bytes
        if budget <= 0:
            return False
        held = sum(m.request.memory_bytes for m in running)
        return self.base_bytes_per_rank + held + request.memory_bytes > budget

    def _retire(self, stale: Member, why: str) -> None:
        """Ends a stale attempt; if the workers may still train it, it leaves them before any
        newer attempt of the job joins (events meanwhile are the stale one's: dropped)."""
        if stale.state is not RUNNING:
            return
        self.append(stale, "job_cancelled", f"Training stopped: {why}")
        self.end(stale, CANCELLED)
        if stale.announced:
            self.retiring[stale.job_id] = stale.attempt

    def fence(self, job_id: str, attempt: int) -> None:
        """Attempt `attempt` of the job is the current one: an older attempt still here is
        cancelled and leaves the workers at the next boundary."""
        member = self.members.get(job_id)
        if member is not None and member.attempt < attempt:
            self._retire(
                member, f"attempt {member.attempt} is stale (attempt {attempt} is current)"
            )

    def release(self, job_id: str) -> None:
        member = self.members.get(job_id)
        if member is not None and member.state is not RUNNING:
            del self.members[job_id]

    def stop(self, job_id: str = STOP_ALL) -> None:
        """Cancels a job at the next step boundary; STOP_ALL also ends the host."""
        if job_id == STOP_ALL:
            self.ending = True
        for member in self.running():
            if job_id not in (STOP_ALL, member.job_id):
                continue
            if not member.announced:  # never reached the workers: nothing to undo
                self.append(member, "job_cancelled", "Training stopped: job cancelled")
                self.end(member, CANCELLED)
            else:  # the workers drop it at their next step boundary
                member.stopping = True

    def job_reports(self, cursors: dict[str, int]) -> dict[str, JobReport]:
        """Each job's state and its events from its cursor. The state is read before the
        events: a job's events are appended before its state changes, so a report that shows
        a final state has also shown all of its events."""
        jobs: dict[str, JobReport] = {}
        for job_id, member in self.members.items():
            state = member.state
            cursor = cursors.get(job_id, 0)
            events = member.events[cursor:]
            jobs[job_id] = {
                "attempt": member.attempt,
                "state": state,
                "events": events,  # type: ignore[typeddict-item]
                "cursor": cursor + len(events),
                "error": member.error,
                "error_code": member.error_code,
            }
        return jobs

    # ---- the workers' calls ---------------------------------------------------------------
    def step_boundary(self, events: list[dict[str, Any]], status: dict[str, Any]) -> dict[str, Any]:
        """Once per step from the workers: the step's events and status in, membership
        changes out: {"join": [JobSpec], "stop": [job id], "end": bool}."""
        now = self.clock()
        for event in events:
            self.record(event)
        if status.get("stepped"):
            self.step = status["step"]
            self.last_step_at = status["last_step_at"]
            self.restarts_without_step = 0
        memory = status.get("memory") or {}
        self.base_bytes_per_rank = memory.get("base_bytes_per_rank", self.base_bytes_per_rank)
        self.publishing = len(status.get("publishing", ()))
        on_workers = set(status.get("live", [])) | set(status.get("pending", []))
        stops: list[str] = []
        for job_id in sorted(self.retiring):
            if "live" in status and job_id not in on_workers:
                del self.retiring[job_id]  # gone from the workers: its successor may join
            else:
                stops.append(job_id)
        for member in self.running():
            runtime = member.request.max_runtime_seconds
            if runtime is None or now - member.admitted_at <= runtime:
                continue
            member.timed_out = True
            if member.announced:  # the workers drop it at this boundary
                member.stopping = True
            else:
                self._cancel(member)
        joins: list[JobSpec] = []
        hand_backs: list[str] = []
        for job_id, member in sorted(self.members.items()):
            if member.state is not RUNNING:
                continue
            if member.stopping:
                stops.append(job_id)
            elif member.hand_back is not None and member.announced:
                hand_backs.append(job_id)  # until the workers say it is checkpointed
            elif member.hand_back is not None:
                self._handed_back(member, None)
            elif not member.announced and job_id not in self.retiring:
                member.announced = True
                joins.append(member.request.job)
        return {
            "join": joins,
            "stop": stops,
            "hand_back": hand_backs,
            "end": self.end_if_idle(now),
        }

    def end_if_idle(self, now: float) -> bool:
        """Whether the workers should leave now: nobody running, and idle long enough (never
        for a warm host) or the host is ending."""
        if self.running():
            self.idle_since = None
            return False
        if self.idle_since is None:
            self.idle_since = now
        idle_over = not self.spec.warm and now - self.idle_since >= self.spec.idle_seconds
        if idle_over:
            self.ending = True
        return self.ending

    def _cancel(self, member: Member) -> None:
        if member.timed_out:
            runtime = member.request.max_runtime_seconds
            error = f"the job ran longer than its max_runtime of {runtime} s"
            self.append(member, "job_failed", f"Training failed: {error}", {"error": error})
            self.end(member, FAILED, error, "timeout")
        else:
            self.append(member, "job_cancelled", "Training stopped: job cancelled")
            self.end(member, CANCELLED)

    def record(self, event: dict[str, Any]) -> None:
        """An event from the workers for one job. Dropped: late events of an ended job, and
        those of a stale attempt (stamped with another attempt, or while it is retiring)."""
        job_id = event.get("job_id") or ""
        member = self.members.get(job_id)
        if member is None or member.state is not RUNNING:
            return
        data = event.get("data") or {}
        attempt = data.get("attempt")
        if (attempt is not None and attempt != member.attempt) or job_id in self.retiring:
            return
        kind = event["type"]
        if kind == "job_cancelled":
            self._cancel(member)
            return
        if kind == "handed_back":  # the workers checkpointed it and let it go
            self._handed_back(member, data.get("step"))
            return
        if kind == "metrics":
            member.steps_done += 1
        self.append(member, kind, event["message"], data)
        ending = JOB_ENDINGS.get(kind)
        if ending is not None:
            error = data.get("error", event["message"]) if ending is FAILED else None
            self.end(member, ending, error, data.get("error_code"))
