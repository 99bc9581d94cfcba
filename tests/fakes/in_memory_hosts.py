"""Pack hosts in memory, for the scheduler's unit tests: the `PackHosts` protocol with no Ray.

Each host's membership is the real host's own (`workers.host.membership.Membership`: who is
admitted or refused and why, stops, fencing, events numbered per job, a terminal state seen
only after all of its events, idle ending); only the workers are faked: they sit at a step
boundary between `step()` calls, so an admitted job is handed to them at once. A test
drives time: `step()` trains every live host one step, `hang()` stops a host stepping,
`lose()` makes it vanish as a dead node would. A finished job's adapter is published to the
object store as the real host does, so the scheduler's verification of it runs for real.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.host_protocol import (
    NO_ANSWER,
    AdmissionRequest,
    AdmissionResult,
    HostReport,
    HostSpec,
    NodeRef,
    Unanswered,
)
from core.object_keys import ADAPTER_FILES
from core.objectstore import ObjectStore
from core.publish import publish_adapter
from core.run_states import STOP_ALL
from core.spec import JobSpec
from orchestrator.scheduling.placement import bundles_of, place
from workers.host.membership import Member, Membership


@dataclass
class _Training:
    """A job on the fake workers: how far it got."""

    job: JobSpec
    total_steps: int
    step: int = 0


@dataclass
class _Host:
    spec: HostSpec
    membership: Membership
    started_at: float
    live: dict[str, _Training] = field(default_factory=dict)  # on the fake workers
    hung: bool = False
    silent_since: float | None = None  # stalled (`stall`): answers no call from then

    @property
    def members(self) -> dict[str, Member]:
        return self.membership.members

    @property
    def alive(self) -> bool:
        return self.membership.alive


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
        # A job handed back (paused, drained) -> the step of its checkpoint: it resumes there.
        self.checkpoints: dict[str, int] = {}
        self.draining: dict[str, str] = {}  # nodes a test drains: node id -> IP
        # Where a test placed a host (its reports name the node), and the nodes it preempted:
        # node id -> the cluster's words for it.
        self.host_nodes: dict[str, NodeRef] = {}
        self.preempted: dict[str, str] = {}
        self.clock = clock
        self.hosts: dict[str, _Host] = {}
        self.started: list[HostSpec] = []
        self.calls: list[tuple[str, str]] = []  # (call, host id), to count polls per tick
        # The cluster's nodes; a live host holds one bundle per worker of them.
        self.nodes: list[dict[str, float]] = [{"CPU": 1024.0, "GPU": 1024.0}]
        self.requested: list[list[dict[str, float]]] = []  # each request to the autoscaler

    # ---- PackHosts ----
    def list_hosts(self) -> list[str]:
        return sorted(self.hosts)

    def start_host(self, spec: HostSpec) -> None:
        self.calls.append(("start_host", spec.host_id))
        self.started.append(spec)
        membership = Membership(spec, clock=self.clock)
        membership.begin_attempt()  # the fake workers are up at once
        membership.idle_since = self.clock()
        self.hosts[spec.host_id] = _Host(spec, membership, started_at=self.clock())

    def admit(self, host_id: str, request: AdmissionRequest) -> AdmissionResult:
        self.calls.append(("admit", host_id))
        host = self.hosts.get(host_id)
        if host is None:
            return AdmissionResult(False, "no such host")
        if host.silent_since is not None:
            return AdmissionResult(False, NO_ANSWER)
        result = host.membership.admit(request)
        if result.admitted:
            self._boundary(host)  # the fake workers take the job at once
        return result

    def fence(self, host_id: str, job_id: str, attempt: int) -> None:
        self.calls.append(("fence", host_id))
        host = self.hosts.get(host_id)
        if host is not None:
            host.membership.fence(job_id, attempt)

    def release(self, host_id: str, job_id: str) -> None:
        self.calls.append(("release", host_id))
        host = self.hosts.get(host_id)
        if host is not None:
            host.membership.release(job_id)

    def poll(self, host_id: str, cursors: dict[str, int]) -> HostReport | None:
        self.calls.append(("poll", host_id))
        host = self.hosts.get(host_id)
        if host is None:
            return None
        membership = host.membership
        return {
            "host_id": host_id,
            "shape": host.spec.shape,
            "alive": membership.alive,
            "warm": host.spec.warm,
            "exclusive": host.spec.exclusive,
            "ending": membership.ending,
            "draining": membership.draining,
            "step": membership.step,
            "last_step_at": membership.last_step_at,
            "started_at": host.started_at,
            "slots_in_use": len(membership.running()),
            "max_slots": host.spec.max_slots,
            "worker_pids": [],
            "worker_starts": membership.worker_starts,
            "memory": {
                "base_bytes_per_rank": 0,
                "peak_bytes_per_rank": 0,
                "slot_bytes": {},
                "lora_bytes_held": 0,
            },
            "jobs": membership.job_reports(cursors),
            **({"node": self.host_nodes[host_id]} if host_id in self.host_nodes else {}),
        }

    def poll_all(
        self, cursors: dict[str, dict[str, int]]
    ) -> dict[str, HostReport | Unanswered | None]:
        answers: dict[str, HostReport | Unanswered | None] = {}
        for host_id, jobs in cursors.items():
            host = self.hosts.get(host_id)
            if host is not None and host.silent_since is not None:
                self.calls.append(("poll", host_id))
                answers[host_id] = Unanswered(host.silent_since)
            else:
                answers[host_id] = self.poll(host_id, jobs)
        return answers

    def wait_for_news(self, timeout: float) -> bool:
        """No news: a test drives the fake workers' steps and the ticks itself."""
        threading.Event().wait(timeout)
        return False

    def stop(self, host_id: str, job_id: str = STOP_ALL) -> None:
        self.calls.append(("stop", host_id))
        host = self.hosts.get(host_id)
        if host is not None:
            host.membership.stop(job_id)

    def hand_back(self, host_id: str, job_id: str, why: str) -> None:
        self.calls.append(("hand_back", host_id))
        host = self.hosts.get(host_id)
        if host is not None:
            host.membership.hand_back(job_id, why)

    def drain(self, host_id: str, why: str) -> None:
        self.calls.append(("drain", host_id))
        host = self.hosts.get(host_id)
        if host is not None:
            host.membership.drain(why)

    def kill(self, host_id: str) -> None:
        self.calls.append(("kill", host_id))
        self.hosts.pop(host_id, None)

    def reap(self) -> list[str]:
        ended = [h for h, host in self.hosts.items() if not host.alive]
        for host_id in ended:
            del self.hosts[host_id]
        return ended

    def free_resources(self) -> list[dict[str, float]]:
        free: list[dict[str, float]] | None = self.nodes
        for host in self.hosts.values():
            if host.alive and free is not None:
                free = place(bundles_of(host.spec.shape), free)
        assert free is not None, "more hosts live than the nodes hold"
        return free

    def draining_nodes(self) -> dict[str, str]:
        return dict(self.draining)

    def preempted_nodes(self, node_ids: Collection[str]) -> dict[str, str]:
        return {n: self.preempted[n] for n in node_ids if n in self.preempted}

    def request_resources(self, bundles: list[dict[str, float]]) -> None:
        self.requested.append([dict(b) for b in bundles])

    # ---- what a test does to the hosts ----
    def step(self) -> None:
        """Every live, unhung host takes one step: the boundary's stops and joins first,
        then each live job trains (its events reach the membership as the workers' do)."""
        for host in list(self.hosts.values()):
            if not host.alive or host.hung:
                continue
            self._boundary(host)
            if not host.alive or not host.live:
                continue
            membership = host.membership
            membership.step += 1
            membership.last_step_at = self.clock()
            membership.restarts_without_step = 0
            pack_size = len(host.live)
            for job_id, training in list(host.live.items()):
                training.step += 1
                self._report(
                    host,
                    job_id,
                    "metrics",
                    f"Step {training.step}/{training.total_steps}",
                    {
                        "step": training.step,
                        "total_steps": training.total_steps,
                        "pack_size": pack_size,
                        "trained_tokens": 10 * training.step,
                    },
                )
                if training.step == training.total_steps:
                    self._publish(host, training.job)
            if membership.end_if_idle(self.clock()):
                membership.alive = False

    def hang(self, host_id: str) -> None:
        self.hosts[host_id].hung = True

    def stall(self, host_id: str) -> None:
        """The host stops answering and stepping (a stopped process, a cut-off node): its
        polls are `Unanswered` from now on, an admit gets no answer."""
        host = self.hosts[host_id]
        host.hung, host.silent_since = True, self.clock()

    def lose(self, host_id: str) -> None:
        self.hosts.pop(host_id, None)

    def preempt(self, host_id: str, said: str = "preempted by the spot notice") -> None:
        """The host's node is preempted: the host vanishes with it, and the cluster lists the
        node as dead with `said` (the host must have been placed on a node in host_nodes)."""
        self.preempted[self.host_nodes[host_id]["node_id"]] = said
        self.lose(host_id)

    def fail_job(self, job_id: str, error: str, code: str = "training_error") -> None:
        """The job's step raised on the workers: it fails alone, as a real host reports it."""
        for host in self.hosts.values():
            if job_id in host.live:
                data = {"error": error, "error_code": code}
                self._report(host, job_id, "job_failed", f"Training failed: {error}", data)

    def job_host(self, job_id: str) -> str | None:
        for host_id, host in self.hosts.items():
            if job_id in host.members:
                return host_id
        return None

    # ---- inside a host: the fake workers ----
    def _boundary(self, host: _Host) -> None:
        """The workers' one call per step: stops and joins out, as the real workers do."""
        status = {"stepped": False, "live": sorted(host.live), "pending": []}
        changes = host.membership.step_boundary([], status)
        for job_id in changes["stop"]:
            if host.live.pop(job_id, None) is not None:
                self._report(host, job_id, "job_cancelled", "Training stopped: job cancelled")
        for job_id in changes["hand_back"]:  # checkpointed at this boundary, as the real one
            training = host.live.get(job_id)
            if training is not None:
                self.checkpoints[job_id] = training.step
                data = {"step": training.step}
                self._report(host, job_id, "handed_back", "Checkpointed and left its slot", data)
        for job in changes["join"]:
            steps = self.job_steps.get(job.job_id, self.steps_per_job)
            start = self.checkpoints.get(job.job_id, 0)
            host.live[job.job_id] = _Training(job, total_steps=steps, step=start)
        if changes["end"]:
            host.membership.alive = False

    def _report(
        self, host: _Host, job_id: str, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        """An event from the fake workers, recorded by the host's own rules."""
        if kind in ("published", "job_failed", "job_cancelled", "handed_back"):
            host.live.pop(job_id, None)
        event = {"job_id": job_id, "type": kind, "message": message, "data": {**(data or {})}}
        host.membership.record(event)

    def _publish(self, host: _Host, job: JobSpec) -> None:
        if self.objects is not None:
            with tempfile.TemporaryDirectory() as folder:
                for name in ADAPTER_FILES:
                    (Path(folder) / name).write_bytes(f"{job.job_id} {name}".encode())
                publish_adapter(self.objects, job.tenant, job.job_id, job.attempt, Path(folder))
        self._report(host, job.job_id, "published", "Adapter published")
