"""The scheduler's host mode: queued jobs join warm pack hosts; one poll per host per tick.

Each tick, `watch()` polls every host once (all its jobs' states and new events in one
call), stores each job's events, finishes the jobs that ended, and runs the watchdog: a
job past its `max_runtime` fails with `timeout`; a host with jobs and no step for
`step_timeout_seconds` is ended and its jobs are requeued, to resume from their
checkpoints on another host (never a silent hang). Then `launch()` places queued jobs
(orchestrator.scheduling.admission): join a host, start one, or wait.

Nothing is kept only in memory that a restarted scheduler would need: a job's host is its
`run_id`, and hosts are found again by listing them. With several schedulers, the host
arbitrates admission (a job is admitted once per attempt) and the database arbitrates the
claim (one guarded UPDATE per attempt); the loser of a claim withdraws its admission.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from core.host_protocol import AdmissionRequest, HostReport, HostShape, PackHosts
from core.memory_estimate import SlotDemand
from core.objectstore import ObjectStore
from core.run_states import RunJobState
from orchestrator.errors import InvalidTransition
from orchestrator.jobs import job_spec_for
from orchestrator.metrics import Capacity, observe_training
from orchestrator.scheduling.admission import HostRoom, WaitingJob, plan_admissions
from orchestrator.scheduling.outcomes import JobOutcomes
from orchestrator.scheduling.packing import wants_packing
from orchestrator.scheduling.placement import (
    Resources,
    StartRoom,
    bundles_of,
    free_after_unplaced,
    host_spec,
    place,
)
from orchestrator.scheduling.sizing import HostSizing, demand_of
from orchestrator.settings import Settings
from orchestrator.states import ACTIVE_RUN_STATUSES, JobStatus
from orchestrator.store import JobStore, new_id
from orchestrator.tables import JobRow

log = logging.getLogger(__name__)

HOST_ID_PREFIX = "host-"  # new_id("host"): a job's run_id in host mode
HOST_START_ALLOWANCE_S = 600.0  # the watchdog's least wait for a host's first step


class HostScheduling:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        objects: ObjectStore,
        hosts: PackHosts,
        *,
        gpu_available: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.objects = objects
        self.hosts = hosts
        self.sizing = HostSizing(settings, gpu_available)
        self.clock = clock
        self.outcomes = JobOutcomes(settings, store, objects, log, _context)
        self.reports: dict[str, HostReport] = {}  # this tick's poll of every host
        self._first_seen: dict[str, float] = {}  # host -> when this scheduler first saw it
        self._admitted_at: dict[str, float] = {}  # host -> this scheduler's last admit there
        # tenant -> when this scheduler last started one of its jobs (fairness's turn order)
        self._last_started: dict[str, float] = {}
        self._unplaceable: set[str] = set()  # shapes the cluster could not place a host of
        self.room_for_runs = StartRoom()  # what `launch` left for `packing: false` runs

    # ---- watch: one poll per host ----
    def watch(self) -> None:
        active = [j for j in self.store.jobs_with_status(ACTIVE_RUN_STATUSES) if on_host(j)]
        by_host: dict[str, list[JobRow]] = defaultdict(list)
        for job in active:
            by_host[job.run_id or ""].append(job)
        alive = set(self.hosts.list_hosts())
        self.reports = {}
        for host_id in sorted(alive | set(by_host)):
            jobs = by_host.get(host_id, [])
            report = (
                self.hosts.poll(host_id, {j.id: j.event_cursor for j in jobs})
                if host_id in alive
                else None
            )
            if report is None:
                for job in jobs:
                    self._host_lost(job, f"its pack host {host_id} disappeared")
                continue
            self._first_seen.setdefault(host_id, self.clock())
            if self._hung(host_id, report):
                self._restart_hung(host_id, jobs)
                continue
            self.reports[host_id] = report
            for job in jobs:
                self._watch_job(host_id, job, report)
            self._tidy(host_id, report, {j.id for j in jobs})
        self.hosts.reap()

    def _watch_job(self, host_id: str, job: JobRow, report: HostReport) -> None:
        polled = report["jobs"].get(job.id)
        if polled is None or polled["attempt"] != job.attempt:
            # Claimed by another scheduler that has not admitted it yet, or lost by the host.
            self._host_lost(job, f"its pack host {host_id} does not have it")
            return
        state = polled["state"]
        if job.status == JobStatus.CANCELLING.value and state is RunJobState.RUNNING:
            self.hosts.stop(host_id, job.id)
        events = [_event(e) for e in polled["events"]]
        tokens = [
            e["data"]["trained_tokens"]
            for e in events
            if e["type"] == "metrics" and "trained_tokens" in (e["data"] or {})
        ]
        stored = self.store.record_run_events(
            job.id, job.attempt, events, polled["cursor"], trained_tokens=(tokens or [None])[-1]
        )
        if not stored:
            return
        observe_training(job.created_at, events)  # counted once: a fenced-off batch is not
        if state is RunJobState.SUCCEEDED:
            self.outcomes.succeed(job)
        elif state is RunJobState.CANCELLED:
            self.outcomes.guarded(self.store.cancel, job.id, attempt=job.attempt)
        elif state is RunJobState.FAILED:
            self.outcomes.fail(
                job, polled["error_code"] or "training_error", polled["error"] or "failed"
            )
        elif self._over_runtime(job):
            self.hosts.stop(host_id, job.id)
            limit = _max_runtime(job)
            self.outcomes.fail(
                job, "timeout", f"the job ran longer than its max_runtime ({limit} s)"
            )
            return
        if state is not RunJobState.RUNNING:
            self.hosts.release(host_id, job.id)

    def _tidy(self, host_id: str, report: HostReport, ours: set[str]) -> None:
        """Jobs on the host that no active job of this host's is: release the ended ones,
        stop the ones still training (their job moved on: timed out, claimed elsewhere)."""
        grace = self.settings.run_start_grace_seconds
        for job_id, polled in report["jobs"].items():
            if job_id in ours:
                continue
            if polled["state"] is not RunJobState.RUNNING:
                self.hosts.release(host_id, job_id)
                continue
            admitted = (polled["events"][0]["data"] or {}).get("time") if polled["events"] else None
            if admitted is not None and self.clock() - admitted < grace:
                continue  # perhaps admitted by another scheduler that is claiming it now
            current = self._row(job_id)
            if current is None or current.run_id != host_id or current.attempt != polled["attempt"]:
                self.hosts.stop(host_id, job_id)

    def capacity(self) -> Capacity:
        """Pack hosts by state and the slots they report in use, from this tick's poll."""
        hosts = Counter(("hosts", _host_state(r)) for r in self.reports.values())
        return Capacity(dict(hosts), sum(r["slots_in_use"] for r in self.reports.values()))

    def _hung(self, host_id: str, report: HostReport) -> bool:
        if not report["slots_in_use"]:
            return False
        activity = max(
            report["last_step_at"] or 0.0,
            report["started_at"],
            self._first_seen.get(host_id, 0.0),
            self._admitted_at.get(host_id, 0.0),
        )
        timeout = self.settings.step_timeout_seconds
        if report["last_step_at"] is None:
            # Never stepped: still starting (worker group, base load and partitioning take
            # minutes for a large base or on a loaded machine), not hung yet.
            timeout = max(timeout, HOST_START_ALLOWANCE_S)
        return self.clock() - activity > timeout

    def _restart_hung(self, host_id: str, jobs: list[JobRow]) -> None:
        timeout = self.settings.step_timeout_seconds
        log.warning(
            "pack host %s made no step for %s s; ending it",
            host_id,
            timeout,
            extra={"host_id": host_id, "run_id": host_id},
        )
        self.hosts.kill(host_id)
        for job in jobs:
            self.outcomes.retry_or_fail(job, f"pack host {host_id} made no step for {timeout:g} s")

    def _over_runtime(self, job: JobRow) -> bool:
        limit = _max_runtime(job)
        started = job.started_at
        return limit is not None and started is not None and self.clock() - started > limit

    # ---- launch: place queued jobs ----
    def launch(self) -> None:
        # `packing: false` jobs are trained alone, each in a run of its own (the scheduler's,
        # within `room_for_runs`).
        queued = [j for j in self.store.jobs_with_status([JobStatus.QUEUED]) if wants_packing(j)]
        all_active = self.store.jobs_with_status(ACTIVE_RUN_STATUSES)
        active = [j for j in all_active if on_host(j)]
        # Those runs count against max_concurrent_runs as hosts do.
        runs_up = len({j.run_id for j in all_active if not on_host(j)})
        shapes: dict[str, HostShape] = {}
        waiting = []
        for job in queued:
            shape = self.sizing.shape_of(job)
            shapes[shape.key] = shape
            waiting.append(
                WaitingJob(
                    job.id, job.tenant, shape.key, job.created_at, _priority(job), demand_of(job)
                )
            )
        for job in active:
            shapes.setdefault(self.sizing.shape_of(job).key, self.sizing.shape_of(job))
        rooms = self._rooms(active)
        plan = plan_admissions(
            waiting,
            rooms,
            running_per_tenant=dict(Counter(j.tenant for j in active)),
            last_started=self._last_started,
            free_host_starts=self.settings.max_concurrent_runs - len(self.reports) - runs_up,
            max_slots=self.settings.max_slots_per_host,
            fits=lambda key, demands: self.sizing.fits(shapes[key], demands),
            new_host_id=lambda: new_id("host"),
        )
        for host_id in plan.retire:
            log.info(
                "ending idle pack host %s to make room",
                host_id,
                extra={"host_id": host_id, "run_id": host_id},
            )
            self.hosts.stop(host_id)
        by_id = {job.id: job for job in queued}
        for job_id in plan.never_fit:
            self.outcomes.fail(
                by_id[job_id],
                "insufficient_memory",
                "the job needs more memory per worker than a pack host has "
                f"({self.settings.host_memory_bytes} B); lower batch_size or max_seq_len",
            )
        started = set()
        free = free_after_unplaced(self.hosts.free_resources(), self.reports.values())
        for start in plan.starts:
            left = self._placed(shapes[start.shape], free)
            if left is not None and self._start_host(start.host_id, shapes[start.shape]):
                free = left
                started.add(start.host_id)
        for join in plan.joins:
            if join.host_id.startswith(HOST_ID_PREFIX) and (
                join.host_id in started or join.host_id in self.reports
            ):
                self.join(by_id[join.job_id], join.host_id)
        self.room_for_runs = self._keep_warm_hosts(free, runs_up + len(started))

    def _placed(self, shape: HostShape, free: list[Resources]) -> list[Resources] | None:
        """The free resources left once a host of `shape` is placed; None (its jobs wait,
        logged once per shape while it lasts) if the cluster cannot place it now."""
        left = place(bundles_of(shape), free)
        if left is None and shape.key not in self._unplaceable:
            log.info("no free resources for a %s pack host now; its jobs wait", shape.key)
        (self._unplaceable.add if left is None else self._unplaceable.discard)(shape.key)
        return left

    def _rooms(self, active: list[JobRow]) -> list[HostRoom]:
        demands: dict[str, list[SlotDemand]] = defaultdict(list)
        for job in active:
            demands[job.run_id or ""].append(demand_of(job))
        return [
            HostRoom(
                host_id,
                report["shape"].key,
                report["max_slots"],
                demands=demands.get(host_id, []),
                ending=report["ending"] or not report["alive"],
                warm=_warm(report),
            )
            for host_id, report in self.reports.items()
        ]

    def _start_host(self, host_id: str, shape: HostShape, *, warm: bool = False) -> bool:
        spec = host_spec(self.settings, host_id, shape, warm=warm)
        try:
            self.hosts.start_host(spec)
        except Exception:
            log.exception(
                "starting pack host %s (%s) failed",
                host_id,
                shape.key,
                extra={"host_id": host_id, "run_id": host_id},
            )
            return False
        log.info("started pack host %s (%s)", host_id, shape.key, extra={"host_id": host_id})
        return True

    def join(self, job: JobRow, host_id: str) -> None:
        """Admit on the host first (it refuses a second admit of this attempt), then claim
        the job in the database (one scheduler wins); a lost claim withdraws the admit."""
        attempt = job.attempt + 1
        request = AdmissionRequest(
            job=replace(job_spec_for(job, self.settings), attempt=attempt),
            priority=_priority(job),
            memory_bytes=self.sizing.job_memory(job),
            max_runtime_seconds=_max_runtime(job),
        )
        result = self.hosts.admit(host_id, request)
        if not result.admitted and result.reason != "already admitted":
            log.info(
                "pack host %s did not admit %s: %s",
                host_id,
                job.id,
                result.reason,
                extra=_context(job, host_id, attempt),
            )
            return
        self._admitted_at[host_id] = self._last_started[job.tenant] = self.clock()
        try:
            self.store.claim(
                job.id,
                job.attempt,
                host_id,
                f"Fine-tuning job started (attempt {attempt}, pack host {host_id})",
            )
            log.info(
                "job %s joined pack host %s", job.id, host_id, extra=_context(job, host_id, attempt)
            )
        except InvalidTransition:
            current = self._row(job.id)
            if current is None or current.run_id != host_id or current.attempt != attempt:
                self.hosts.stop(host_id, job.id)  # cancelled meanwhile, or runs elsewhere

    def _keep_warm_hosts(self, free: list[Resources], started: int) -> StartRoom:
        """Per base model, `warm_hosts` hosts of the default shape stay up with no job;
        `started`: runs up and hosts started this tick. The room left after them."""
        room = self.settings.max_concurrent_runs - len(self.reports) - started
        if not self.settings.warm_hosts:
            return StartRoom(room, free)
        # Warmth is what each host reports (its spec), so hosts adopted after a restart
        # count too, not only those this scheduler started.
        warm_now = Counter(
            r["shape"].base_model for r in self.reports.values() if _warm(r) and r["alive"]
        )
        for base in sorted(self.settings.base_models):
            for _ in range(self.settings.warm_hosts - warm_now[base]):
                if room <= 0:
                    return StartRoom(room, free)
                shape = self.sizing.shape(base, self.settings.default_num_workers)
                left = self._placed(shape, free)
                if left is not None and self._start_host(new_id("host"), shape, warm=True):
                    room, free = room - 1, left
        return StartRoom(room, free)

    # ---- outcomes (orchestrator.scheduling.outcomes: each a guarded change) ----
    def _host_lost(self, job: JobRow, reason: str) -> None:
        started = job.started_at or 0
        if self.clock() - started < self.settings.run_start_grace_seconds:
            return  # claimed a moment ago: its admission may not be visible yet
        self.outcomes.retry_or_fail(job, reason)

    def _row(self, job_id: str) -> JobRow | None:
        try:
            return self.store.job(job_id)
        except Exception:
            return None


def on_host(job: JobRow) -> bool:
    return bool(job.run_id and job.run_id.startswith(HOST_ID_PREFIX))


def _context(job: JobRow, host_id: str | None = None, attempt: int | None = None) -> dict[str, Any]:
    """`extra=` of a log call about a job on a pack host (a host id is the job's run id)."""
    host = host_id or job.run_id
    return {
        "job_id": job.id,
        "host_id": host,
        "run_id": host,
        "attempt": job.attempt if attempt is None else attempt,
        "tenant": job.tenant,
    }


def _host_state(report: HostReport) -> str:
    if report["ending"] or not report["alive"]:
        return "ending"
    return "busy" if report["slots_in_use"] else "idle"


def _priority(job: JobRow) -> int:
    return job.priority or 0


def _max_runtime(job: JobRow) -> float | None:
    return float(job.max_runtime) if job.max_runtime else None


def _event(event: Any) -> dict[str, Any]:
    level = "error" if event["type"] == "job_failed" else "info"
    return {
        "type": event["type"],
        "message": event["message"],
        "level": level,
        "data": event["data"],
    }


def _warm(report: HostReport) -> bool:
    # .get: a host started by an older lorafleet (hosts outlive serve) does not say.
    return bool(report.get("warm", False))
