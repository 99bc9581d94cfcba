"""A pack host on Ray: a detached, named actor `lorafleet-host-{host_id}` that owns a long-lived
`TorchTrainer.fit()` whose workers keep one base loaded while jobs join and leave.

Membership lives here, not in the frozen run spec: the scheduler admits and stops jobs
through this actor, and rank 0 of the workers asks it once per step (`step_boundary`) for
the changes, handing over every job's events of the step in the same call. After a worker
restart the workers ask again from scratch, so every member comes back (from its own
checkpoint or its start); each job has a restart budget of its own. The scheduler reads
everything with one `poll` per host (protocol: `core.host_protocol`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from core.host_protocol import (
    AdmissionRequest,
    AdmissionResult,
    HostReport,
    HostSpec,
    JobReport,
)
from core.run_states import STOP_ALL, RunJobState
from workers.runtime.ray_trainer import FitFailure, trainer_for

RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    RunJobState.RUNNING,
    RunJobState.SUCCEEDED,
    RunJobState.FAILED,
    RunJobState.CANCELLED,
)
# Events from the workers that end one job.
_JOB_ENDINGS = {"published": SUCCEEDED, "job_failed": FAILED, "job_cancelled": CANCELLED}


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
    restarts: int = 0  # worker restarts this job went through
    timed_out: bool = False


@ray.remote(num_cpus=0, max_concurrency=8)  # type: ignore[call-overload]
class PackHost:
    def __init__(self, spec: HostSpec) -> None:
        self.spec = spec
        self.members: dict[str, Member] = {}
        self._stopping: set[str] = set()  # announced jobs to stop at the next boundary
        self.ending = False  # admits nothing more; the workers leave once no job is on
        self.alive = True
        self.started_at = time.time()
        # Idle time counts from the first step boundary: a host still loading its base is
        # starting, not idle (on a loaded machine that can take longer than idle_seconds).
        self.idle_since: float | None = None
        self.worker_starts = 0
        self.restarts_without_step = 0
        self.step = 0
        self.last_step_at: float | None = None
        self.worker_pids: list[int] = []
        self.memory: dict[str, Any] = {
            "base_bytes_per_rank": 0,
            "peak_bytes_per_rank": 0,
            "slot_bytes": {},
        }
        self.error: str | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ---- life ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._fit, name="fit", daemon=True)
            self._thread.start()

    def _fit(self) -> None:
        from workers.host.worker_loop import host_loop_per_worker

        spec, shape = self.spec, self.spec.shape
        trainer = trainer_for(
            host_loop_per_worker,
            {"spec": spec, "host": ray.get_runtime_context().current_actor},
            name=f"host-{spec.host_id}",
            storage_path=spec.storage_path,
            num_workers=shape.num_workers,
            use_gpu=shape.use_gpu,
            # Restarts are budgeted per job (begin_attempt); the host itself gives up
            # only when restarts keep coming with no step in between.
            max_failures=-1,
        )
        try:
            trainer.fit()
            self._end_unfinished("the host ended with jobs on it", "infrastructure")
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the jobs
            failure = FitFailure.of(exc)
            self.error = failure.error
            self._end_unfinished(self.error, failure.code, traceback=failure.traceback)
        finally:
            with self._lock:
                self.alive, self.ending = False, True

    def _end_unfinished(self, error: str, code: str, **data: Any) -> None:
        with self._lock:
            for member in self.members.values():
                if member.state is not RUNNING:
                    continue
                self._append(member, "message", f"Training failed: {error}"[:2000], data or None)
                self._end(member, FAILED, error, code)

    # ---- bookkeeping (under the lock) ----------------------------------------------------
    def _append(
        self, member: Member, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        data = dict(data or {})
        data.setdefault("time", time.time())
        member.events.append(
            {"seq": len(member.events), "type": kind, "message": message, "data": data}
        )

    def _end(
        self, member: Member, state: RunJobState, error: str | None = None, code: str | None = None
    ) -> None:
        member.state = state
        if state is FAILED:
            member.error, member.error_code = error, code or "training_error"

    def _running(self) -> list[Member]:
        return [m for m in self.members.values() if m.state is RUNNING]

    # ---- called by the scheduler ---------------------------------------------------------
    def admit(self, request: AdmissionRequest) -> AdmissionResult:
        """Takes a job at the next step boundary, unless full, ending or already here."""
        shape = self.spec.shape
        with self._lock:
            known = self.members.get(request.job_id)
            if known is not None and known.request.attempt >= request.attempt:
                return AdmissionResult(False, "already admitted")
            if self.ending or not self.alive:
                return AdmissionResult(False, "ending")
            if request.job.base_model_uri != shape.base_model_uri:
                return AdmissionResult(False, "shape mismatch")
            if len(self._running()) >= self.spec.max_slots:
                return AdmissionResult(False, "full")
            member = Member(request, admitted_at=time.time())
            self.members[request.job_id] = member
            self.idle_since = None
            self._append(member, "message", f"Admitted to pack host {self.spec.host_id}")
            return AdmissionResult(True)

    def release(self, job_id: str) -> None:
        with self._lock:
            member = self.members.get(job_id)
            if member is not None and member.state is not RUNNING:
                del self.members[job_id]

    def stop(self, job_id: str = STOP_ALL) -> None:
        """Cancels a job at the next step boundary; STOP_ALL also ends the host."""
        with self._lock:
            if job_id == STOP_ALL:
                self.ending = True
            for member in self._running():
                if job_id not in (STOP_ALL, member.request.job_id):
                    continue
                if not member.announced:  # never reached the workers: nothing to undo
                    self._append(member, "job_cancelled", "Training stopped: job cancelled")
                    self._end(member, CANCELLED)
                else:  # the workers drop it at their next step boundary
                    self._stopping.add(member.request.job_id)

    def poll(self, cursors: dict[str, int]) -> HostReport:
        """One call per host: figures, then each job's state and its events from its cursor.
        The state is read before the events: a job's events are appended before its state
        changes, so a poll that sees a final state has also seen all of its events."""
        with self._lock:
            jobs: dict[str, JobReport] = {}
            for job_id, member in self.members.items():
                state = member.state
                cursor = cursors.get(job_id, 0)
                events = member.events[cursor:]
                jobs[job_id] = {
                    "attempt": member.request.attempt,
                    "state": state,
                    "events": events,  # type: ignore[typeddict-item]
                    "cursor": cursor + len(events),
                    "error": member.error,
                    "error_code": member.error_code,
                }
            return {
                "host_id": self.spec.host_id,
                "shape": self.spec.shape,
                "alive": self.alive,
                "warm": self.spec.warm,
                "ending": self.ending,
                "step": self.step,
                "last_step_at": self.last_step_at,
                "started_at": self.started_at,
                "slots_in_use": len(self._running()),
                "max_slots": self.spec.max_slots,
                "worker_pids": list(self.worker_pids),
                "worker_starts": self.worker_starts,
                "memory": dict(self.memory),  # type: ignore[typeddict-item]
                "jobs": jobs,
            }

    def finished(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    # ---- called by rank 0 of the workers -------------------------------------------------
    def begin_attempt(self, worker_pids: list[int]) -> dict[str, Any]:
        """The workers (re)start: every running member will be announced to them again, and
        each one that was on the workers that died spends one restart of its own budget."""
        with self._lock:
            self.worker_starts += 1
            self.worker_pids = list(worker_pids)
            restart = self.worker_starts - 1
            if restart:
                self.restarts_without_step += 1
            for member in self._running():
                if not member.announced:
                    continue
                member.announced = False
                member.restarts += 1
                if member.restarts > self.spec.max_job_restarts:
                    error = f"workers failed {member.restarts} times while training this job"
                    self._append(member, "job_failed", f"Training failed: {error}")
                    self._end(member, FAILED, error, "infrastructure")
                else:
                    self._append(
                        member,
                        "message",
                        f"Workers restarted after a failure (restart {member.restarts} of "
                        f"{self.spec.max_job_restarts}); resuming from the job's checkpoint",
                        {"restart": member.restarts},
                    )
            give_up = self.restarts_without_step > self.spec.max_job_restarts + 1
            if give_up:
                self.ending = True
            return {"restart": restart, "end": give_up}

    def step_boundary(self, events: list[dict[str, Any]], status: dict[str, Any]) -> dict[str, Any]:
        """Once per step from rank 0: the step's events in, membership changes out."""
        now = time.time()
        with self._lock:
            for event in events:
                self._record(event)
            if status.get("stepped"):
                self.step = status["step"]
                self.last_step_at = status["last_step_at"]
                self.restarts_without_step = 0
            self.memory = status.get("memory", self.memory)
            for member in self._running():
                runtime = member.request.max_runtime_seconds
                if runtime is not None and now - member.admitted_at > runtime:
                    member.timed_out = True
                    self._stopping.add(member.request.job_id)
            joins, stops = [], []
            for job_id, member in sorted(self.members.items()):
                if member.state is not RUNNING:
                    continue
                if job_id in self._stopping:
                    if member.announced:
                        stops.append(job_id)
                    else:
                        self._cancel(member)
                    continue
                if not member.announced:
                    member.announced = True
                    joins.append(member.request.job)
            running = self._running()
            if running:
                self.idle_since = None
            elif self.idle_since is None:
                self.idle_since = now
            idle_over = (
                not self.spec.warm
                and self.idle_since is not None
                and now - self.idle_since >= self.spec.idle_seconds
            )
            if not running and (idle_over or self.ending):
                self.ending = True
            return {"join": joins, "stop": stops, "end": self.ending and not running}

    def _cancel(self, member: Member) -> None:
        job_id = member.request.job_id
        self._stopping.discard(job_id)
        if member.timed_out:
            runtime = member.request.max_runtime_seconds
            error = f"the job ran longer than its max_runtime of {runtime} s"
            self._append(member, "job_failed", f"Training failed: {error}", {"error": error})
            self._end(member, FAILED, error, "timeout")
        else:
            self._append(member, "job_cancelled", "Training stopped: job cancelled")
            self._end(member, CANCELLED)

    def _record(self, event: dict[str, Any]) -> None:
        """An event from the workers for one job; late events for an ended job are dropped."""
        member = self.members.get(event.get("job_id") or "")
        if member is None or member.state is not RUNNING:
            return
        kind = event["type"]
        if kind == "job_cancelled":
            self._cancel(member)
            return
        data = event.get("data")
        self._append(member, kind, event["message"], data)
        ending = _JOB_ENDINGS.get(kind)
        if ending is not None:
            error = (data or {}).get("error", event["message"]) if ending is FAILED else None
            self._end(member, ending, error, (data or {}).get("error_code"))
            self._stopping.discard(member.request.job_id)
