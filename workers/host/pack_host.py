"""A pack host on Ray: a detached, named actor `lorafleet-host-{host_id}` that owns a long-lived
`TorchTrainer.fit()` whose workers keep one base loaded while jobs join and leave.

Membership lives here, not in the frozen run spec: the scheduler admits and stops jobs
through this actor, and rank 0 of the workers asks it once per step (`step_boundary`) for
the changes, handing over every job's events of the step in the same call. After a worker
restart the workers ask again from scratch, so every member comes back (from its own
checkpoint or its start); each job has a restart budget of its own. The rules themselves
are pure (`workers.host.membership`), shared with the scheduler's in-memory fake; this actor
adds the lock, the workers' thread and the figures. The scheduler reads everything with one
`poll` per host (protocol: `core.host_protocol`).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray

from core.host_protocol import (
    AdmissionRequest,
    AdmissionResult,
    HostReport,
    HostSpec,
    NodeRef,
)
from core.run_states import STOP_ALL
from core.spec import JobSpec
from workers.host.integrations import IntegrationRuns
from workers.host.membership import RUNNING, Membership
from workers.host.node_loss import LATE_LOOK_S, LateLook, LostNode, lost_nodes
from workers.host.requests import RequestQueue
from workers.runtime.ray_trainer import FitFailure, trainer_for


@ray.remote(num_cpus=0, max_concurrency=8)  # type: ignore[call-overload]
class PackHost:
    def __init__(self, spec: HostSpec) -> None:
        self.spec = spec
        self.membership = Membership(spec, clock=time.time)
        self.requests = RequestQueue()  # Tinker requests for request-driven slots
        self.started_at = time.time()
        self.worker_pids: list[int] = []
        self.worker_nodes: list[NodeRef] = []  # per rank: its node's id and IP
        # The host's own node (its Ray Train controller runs there too).
        self.node = NodeRef(
            node_id=ray.get_runtime_context().get_node_id(), ip=ray.util.get_node_ip_address()
        )
        self.memory: dict[str, Any] = {
            "base_bytes_per_rank": 0,
            "peak_bytes_per_rank": 0,
            "slot_bytes": {},
        }
        self.error: str | None = None
        self.setup_failed = False  # a setup phase of the workers passed its time limit
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # News the scheduler waits for (`wait_news`): counted up on what it should store at
        # once (a job's first step, any other event but metrics, the host's end).
        self.news = 0
        self._news = threading.Condition(self._lock)
        # Long polls of the Tinker path (issue 21): an idle rank 0 waits in `step_boundary`
        # for work (any call that changes what the workers should do counts it up), and the
        # dispatcher waits in `tinker_collect` for answers, rather than each polling.
        self.work, self._work_seen = 0, 0
        self._work = threading.Condition(self._lock)
        self._answered = threading.Condition(self._lock)
        self.integrations = IntegrationRuns(spec.wandb_dir)
        self.late_look: LateLook | None = None  # a restart that named no node yet

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
            node_group=shape.node_group,
            # Restarts are budgeted per job (begin_attempt); the host itself gives up
            # only when restarts keep coming with no step in between.
            max_failures=-1,
        )
        try:
            trainer.fit()
            with self._lock:
                self.membership.end_unfinished("the host ended with jobs on it", "infrastructure")
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the jobs
            failure = FitFailure.of(exc)
            self.error = failure.error
            with self._lock:
                self.membership.end_unfinished(
                    failure.error, failure.code, traceback=failure.traceback
                )
        finally:
            with self._lock:
                self.membership.alive, self.membership.ending = False, True
                # The workers are gone for good: what they had taken and never answered (the
                # ending boundary's, or all of it when the host gave up) is handed back unrun.
                self.requests.workers_lost()
                self._tell_news()
                self._answered.notify_all()  # its collectors look again (the host is gone)
            self.integrations.finish_all()

    # ---- called by the scheduler ---------------------------------------------------------
    def admit(self, request: AdmissionRequest) -> AdmissionResult:
        """Takes a job at the next step boundary, or says why not (workers.host.membership)."""
        with self._lock:
            self._new_work()
            return self.membership.admit(request)

    def release(self, job_id: str) -> None:
        with self._lock:
            self._new_work()
            self.membership.release(job_id)

    def stop(self, job_id: str = STOP_ALL) -> None:
        """Cancels a job at the next step boundary; STOP_ALL also ends the host."""
        with self._lock:
            self._new_work()
            self.membership.stop(job_id)

    def hand_back(self, job_id: str, why: str) -> None:
        """Checkpoints a job at the next step boundary and gives it back (a pause)."""
        with self._lock:
            self._new_work()
            self.membership.hand_back(job_id, why)

    def drain(self, why: str) -> None:
        """Admits nothing more; every job is checkpointed and given back; then the host ends."""
        with self._lock:
            self._new_work()
            self.membership.drain(why)

    def fence(self, job_id: str, attempt: int) -> None:
        """`attempt` is the job's current attempt: an older one here is dropped."""
        with self._lock:
            self._new_work()
            self.membership.fence(job_id, attempt)

    def poll(self, cursors: dict[str, int]) -> HostReport:
        """One call per host: figures, then each job's state and its events from its cursor."""
        self._look_again()
        with self._lock:
            membership = self.membership
            return {
                "host_id": self.spec.host_id,
                "shape": self.spec.shape,
                "alive": membership.alive,
                "warm": self.spec.warm,
                "exclusive": self.spec.exclusive,
                "ending": membership.ending,
                "draining": membership.draining,
                "step": membership.step,
                "last_step_at": membership.last_step_at,
                "started_at": self.started_at,
                "slots_in_use": len(membership.running()),
                "publishing": membership.publishing,
                "max_slots": self.spec.max_slots,
                "worker_pids": list(self.worker_pids),
                "worker_nodes": list(self.worker_nodes),
                "node": self.node,
                "worker_starts": membership.worker_starts,
                "memory": dict(self.memory),  # type: ignore[typeddict-item]
                "jobs": membership.job_reports(cursors),
                # What its Tinker models hold, for admission (core.tinker_memory).
                "request_models": self.requests.memory(),
            }

    def finished(self) -> bool:
        """The workers ended, and no Tinker model's move waits to be collected (the actor
        goes once this says so)."""
        with self._lock:
            owed = self.requests.owes_moves()
        return self._thread is not None and not self._thread.is_alive() and not owed

    def wait_news(self, seen: int, timeout: float) -> int:
        """The news count once it differs from `seen` (the caller's last), or after
        `timeout`: a long poll, so the scheduler stores a job's first step (or its end)
        as it happens rather than at its next poll."""
        with self._news:
            self._news.wait_for(lambda: self.news != seen, timeout=timeout)
            return self.news

    def _new_work(self) -> None:
        """Called holding the lock: something for the workers' next boundary."""
        self.work += 1
        self._work.notify_all()

    def _tell_news(self) -> None:
        """Called holding the lock."""
        self.news += 1
        self._news.notify_all()

    def _is_news(self, events: list[dict[str, Any]]) -> bool:
        """Whether the workers' events (not yet recorded) hold something worth a wake-up:
        anything but a metrics event, or a job's first metrics event on this host."""
        for event in events:
            if event.get("type") != "metrics":
                return True
            member = self.membership.members.get(event.get("job_id") or "")
            if member is not None and member.steps_done == 0:
                return True
        return False

    # ---- called by rank 0 of the workers -------------------------------------------------
    def begin_attempt(
        self, worker_pids: list[int], worker_nodes: list[dict[str, str]] | None = None
    ) -> dict[str, Any]:
        """The workers (re)start: every running member will be announced to them again."""
        lost = self._lost_nodes(self.worker_nodes) if self.worker_nodes else []
        with self._lock:
            # A restart: the Tinker models on the old workers are gone (workers.host.requests).
            if self.worker_pids and self.requests.workers_lost():
                self._answered.notify_all()
            # Ray may declare the lost node dead only later: looked for again (poll).
            restart = bool(self.worker_nodes)
            self.late_look = (
                LateLook(list(self.worker_nodes), time.time() + LATE_LOOK_S)
                if restart and not lost
                else None
            )
            self.worker_pids = list(worker_pids)
            self.worker_nodes = [
                NodeRef(node_id=n["node_id"], ip=n["ip"]) for n in worker_nodes or []
            ]
            return self.membership.begin_attempt(lost)

    def _lost_nodes(self, ranks: list[NodeRef]) -> list[LostNode]:
        """The nodes of `ranks` that Ray now says are gone, each preempted or lost."""
        try:
            return lost_nodes(ranks, ray.nodes())
        except Exception:  # noqa: BLE001 - words and a budget: never the restart's failure
            return []

    def _look_again(self) -> None:
        """After a restart that named no node: whether Ray now says one of the last workers'
        nodes is gone (at most once a second, for LATE_LOOK_S); if so the jobs are told."""
        look, now = self.late_look, time.time()
        if look is None or not look.due(now):
            if look is not None and look.over(now):
                self.late_look = None
            return
        look.last = now
        lost = self._lost_nodes(look.ranks)  # outside the lock: a call to Ray's GCS
        if not lost:
            return
        with self._lock:
            if self.late_look is look:  # no newer restart meanwhile
                self.late_look = None
                self.membership.explain_restart(lost)
                self._tell_news()

    def setup_gave_up(self) -> bool:
        """Asked by each worker as it starts: workers restarted after a setup timeout leave
        at once, rather than time out again and again."""
        return self.setup_failed

    def fail_setup(self, phase: str, error: str) -> None:
        """A rank's setup phase passed its time limit (`workers.runtime.setup_guard`): the
        host ends, and every job on it fails with `setup_timeout`, the error naming the phase.
        Any rank may be the stuck one, so each may call: the first call fails the jobs."""
        with self._lock:
            self.setup_failed = True
            self.membership.ending = True
            for member in self.membership.running():
                self.membership.fail(member, error, "setup_timeout", phase=phase)
            self._tell_news()

    def step_boundary(
        self, events: list[dict[str, Any]], status: dict[str, Any], idle_wait: float = 0.0
    ) -> dict[str, Any]:
        """Once per step from rank 0: the step's events in, membership changes out. The
        events the membership kept then go to the jobs' integrations (outside the lock: a
        W&B call may be slow, and poll must not wait for it). An idle rank 0 passes
        `idle_wait`: a call with nothing to hand in waits up to that long for work (a Tinker
        request, a job admitted or stopped: anything since the last boundary ends it)."""
        with self._lock:
            if idle_wait > 0 and not events and not status.get("request_answers"):
                self._work.wait_for(
                    lambda: bool(self.requests.queued) or self.work != self._work_seen,
                    timeout=idle_wait,
                )
            self._work_seen = self.work
            self.memory = status.get("memory", self.memory)
            if self._is_news(events):
                self._tell_news()  # the waiter runs once the lock is let go, recorded
            self.requests.answer(status.get("request_answers", []), status.get("request_models"))
            if self.requests.answers:
                self._answered.notify_all()
            seen = {job_id: len(m.events) for job_id, m in self.membership.members.items()}
            changes = self.membership.step_boundary(events, status)
            changes["requests"] = self.requests.take()
            if self.membership.ending:  # its Tinker models move first (workers.host.requests)
                changes["requests"] += self.requests.relocations()
                changes["end"] = changes["end"] and not self.requests.holds_end()
            kept = [
                (m.request.job, m.events[seen.get(job_id, 0) :], m.state is not RUNNING)
                for job_id, m in self.membership.members.items()
            ]
        self._integrations(kept)
        return changes

    def _integrations(self, kept: list[tuple[JobSpec, list[dict[str, Any]], bool]]) -> None:
        """Each job's new events to its integrations; a job that ended (or left the host)
        finishes its run. A logging failure is said once, in that job's events."""
        for job, new, ended in kept:
            problem = self.integrations.log(job, new)
            if problem is not None:
                with self._lock:
                    member = self.membership.members.get(job.job_id)
                    if member is not None:
                        self.membership.append(member, "integration_failed", problem)
                        member.events[-1]["level"] = "warn"
            if ended:
                self.integrations.finish(job.job_id)
        here = {job.job_id for job, _, ended in kept if not ended}
        for job_id in set(self.integrations.runs) - here:
            self.integrations.finish(job_id)

    # ---- called by the scheduler's Tinker dispatcher (orchestrator.tinker.dispatch) -------
    def tinker_submit(self, requests: list[dict[str, Any]]) -> None:
        """Queues Tinker requests for the next step boundary (workers.host.requests)."""
        with self._lock:
            self.requests.submit(requests)
            self._new_work()
            if self.requests.answers:  # some bounced unrun (a model moving away)
                self._answered.notify_all()

    def tinker_collect(self, wait: float = 0.0) -> list[dict[str, Any]]:
        """The Tinker requests answered since the last call; with `wait`, a long poll that
        returns once there are any (or the host ended), or after `wait` seconds."""
        with self._lock:
            if wait > 0:
                self._answered.wait_for(
                    lambda: bool(self.requests.answers) or not self.membership.alive,
                    timeout=wait,
                )
            return self.requests.collect()
