"""Pack hosts in memory, for the scheduler's unit tests: the `PackHosts` protocol with no Ray.

It keeps the host's rules that the scheduler relies on (a job admitted once per attempt,
a full or ending host refuses, events numbered per job, a terminal state seen only after
all of its events), and lets a test drive time: `step()` trains every live host one step,
`hang()` stops a host stepping, `lose()` makes it vanish as a dead node would. A finished
job's adapter is published to the object store as the real host does, so the scheduler's
verification of it runs for real.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.host_protocol import (
    AdmissionRequest,
    AdmissionResult,
    HostEvent,
    HostReport,
    HostSpec,
    JobReport,
)
from core.object_keys import ADAPTER_FILES
from core.objectstore import ObjectStore
from core.publish import publish_adapter
from core.run_states import STOP_ALL, RunJobState
from orchestrator.scheduling.placement import bundles_of, place


@dataclass
class _Member:
    request: AdmissionRequest
    total_steps: int
    state: RunJobState = RunJobState.RUNNING
    step: int = 0
    events: list[HostEvent] = field(default_factory=list)
    error: str | None = None
    error_code: str | None = None
    stopping: bool = False


@dataclass
class _Host:
    spec: HostSpec
    started_at: float
    members: dict[str, _Member] = field(default_factory=dict)
    step: int = 0
    last_step_at: float | None = None
    idle_since: float | None = None
    ending: bool = False
    alive: bool = True
    hung: bool = False

    def running(self) -> list[_Member]:
        return [m for m in self.members.values() if m.state is RunJobState.RUNNING]


class InMemoryHosts:
    def __init__(
        self,
        objects: ObjectStore | None = None,
        *,
        steps_per_job: int = 3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.objects = objects
        self.steps_per_job = steps_per_job
        self.job_steps: dict[str, int] = {}  # a test's own step count for a job
        self.clock = clock
        self.hosts: dict[str, _Host] = {}
        self.started: list[HostSpec] = []
        self.calls: list[tuple[str, str]] = []  # (call, host id), to count polls per tick
        # The cluster's nodes; a live host holds one bundle per worker of them.
        self.nodes: list[dict[str, float]] = [{"CPU": 1024.0, "GPU": 1024.0}]

    # ---- PackHosts ----
    def list_hosts(self) -> list[str]:
        return sorted(self.hosts)

    def start_host(self, spec: HostSpec) -> None:
        self.calls.append(("start_host", spec.host_id))
        self.started.append(spec)
        self.hosts[spec.host_id] = _Host(spec, started_at=self.clock(), idle_since=self.clock())

    def admit(self, host_id: str, request: AdmissionRequest) -> AdmissionResult:
        self.calls.append(("admit", host_id))
        host = self.hosts.get(host_id)
        if host is None:
            return AdmissionResult(False, "no such host")
        known = host.members.get(request.job_id)
        if known is not None and known.request.attempt >= request.attempt:
            return AdmissionResult(False, "already admitted")
        if host.ending or not host.alive:
            return AdmissionResult(False, "ending")
        if request.job.base_model_uri != host.spec.shape.base_model_uri:
            return AdmissionResult(False, "shape mismatch")
        if len(host.running()) >= host.spec.max_slots:
            return AdmissionResult(False, "full")
        steps = self.job_steps.get(request.job_id, self.steps_per_job)
        member = _Member(request, total_steps=steps)
        host.members[request.job_id] = member
        host.idle_since = None
        self._append(member, "message", f"Admitted to pack host {host_id}")
        return AdmissionResult(True)

    def release(self, host_id: str, job_id: str) -> None:
        self.calls.append(("release", host_id))
        host = self.hosts.get(host_id)
        member = host.members.get(job_id) if host else None
        if host is not None and member is not None and member.state is not RunJobState.RUNNING:
            del host.members[job_id]

    def poll(self, host_id: str, cursors: dict[str, int]) -> HostReport | None:
        self.calls.append(("poll", host_id))
        host = self.hosts.get(host_id)
        if host is None:
            return None
        jobs: dict[str, JobReport] = {}
        for job_id, member in host.members.items():
            cursor = cursors.get(job_id, 0)
            events = member.events[cursor:]
            jobs[job_id] = {
                "attempt": member.request.attempt,
                "state": member.state,
                "events": events,
                "cursor": cursor + len(events),
                "error": member.error,
                "error_code": member.error_code,
            }
        return {
            "host_id": host_id,
            "shape": host.spec.shape,
            "alive": host.alive,
            "warm": host.spec.warm,
            "ending": host.ending,
            "step": host.step,
            "last_step_at": host.last_step_at,
            "started_at": host.started_at,
            "slots_in_use": len(host.running()),
            "max_slots": host.spec.max_slots,
            "worker_pids": [],
            "worker_starts": 1,
            "memory": {
                "base_bytes_per_rank": 0,
                "peak_bytes_per_rank": 0,
                "slot_bytes": {},
                "lora_bytes_held": 0,
            },
            "jobs": jobs,
        }

    def stop(self, host_id: str, job_id: str = STOP_ALL) -> None:
        self.calls.append(("stop", host_id))
        host = self.hosts.get(host_id)
        if host is None:
            return
        if job_id == STOP_ALL:
            host.ending = True
        for member in host.running():
            if job_id in (STOP_ALL, member.request.job_id):
                member.stopping = True

    def kill(self, host_id: str) -> None:
        self.calls.append(("kill", host_id))
        self.hosts.pop(host_id, None)

    def reap(self) -> list[str]:
        ended = [h for h, host in self.hosts.items() if not host.alive]
        for host_id in ended:
            del self.hosts[host_id]
        return ended

    # ---- what a test does to the hosts ----
    def free_resources(self) -> list[dict[str, float]]:
        free: list[dict[str, float]] | None = self.nodes
        for host in self.hosts.values():
            if host.alive and free is not None:
                free = place(bundles_of(host.spec.shape), free)
        assert free is not None, "more hosts live than the nodes hold"
        return free

    def step(self) -> None:
        """Every live, unhung host takes one step: stops first, then each job trains."""
        now = self.clock()
        for host in list(self.hosts.values()):
            if not host.alive or host.hung:
                continue
            for member in host.running():
                if member.stopping:
                    self._append(member, "job_cancelled", "Training stopped: job cancelled")
                    member.state = RunJobState.CANCELLED
            active = host.running()
            if active:
                host.step += 1
                host.last_step_at = now
            for member in active:
                member.step += 1
                self._append(
                    member,
                    "metrics",
                    f"Step {member.step}/{member.total_steps}",
                    {
                        "step": member.step,
                        "total_steps": member.total_steps,
                        "pack_size": len(active),
                        "trained_tokens": 10 * member.step,
                    },
                )
                if member.step == member.total_steps:
                    self._publish(member)
            self._end_if_idle(host, now)

    def hang(self, host_id: str) -> None:
        self.hosts[host_id].hung = True

    def lose(self, host_id: str) -> None:
        self.hosts.pop(host_id, None)

    def fail_job(self, job_id: str, error: str, code: str = "training_error") -> None:
        for host in self.hosts.values():
            member = host.members.get(job_id)
            if member is not None and member.state is RunJobState.RUNNING:
                self._append(member, "job_failed", f"Training failed: {error}")
                member.state, member.error, member.error_code = RunJobState.FAILED, error, code

    def job_host(self, job_id: str) -> str | None:
        for host_id, host in self.hosts.items():
            if job_id in host.members:
                return host_id
        return None

    # ---- inside a host ----
    def _append(
        self, member: _Member, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        member.events.append(
            {
                "seq": len(member.events),
                "type": kind,
                "message": message,
                "data": {**(data or {}), "time": self.clock()},
            }
        )

    def _publish(self, member: _Member) -> None:
        job = member.request.job
        if self.objects is not None:
            with tempfile.TemporaryDirectory() as folder:
                for name in ADAPTER_FILES:
                    (Path(folder) / name).write_bytes(f"{job.job_id} {name}".encode())
                publish_adapter(self.objects, job.tenant, job.job_id, job.attempt, Path(folder))
        self._append(member, "published", "Adapter published")
        member.state = RunJobState.SUCCEEDED

    def _end_if_idle(self, host: _Host, now: float) -> None:
        if host.running():
            host.idle_since = None
            return
        if host.idle_since is None:
            host.idle_since = now
        if host.ending or (not host.spec.warm and now - host.idle_since >= host.spec.idle_seconds):
            host.alive, host.ending = False, True
