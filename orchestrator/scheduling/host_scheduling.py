"""Scheduling on pack hosts: queued jobs join warm pack hosts; one poll per host per tick.

Each tick, `watch()` polls every host and runs the watchdog (orchestrator.scheduling.host_watch);
then `launch()`, here, places queued jobs (orchestrator.scheduling.admission): join a
host, start one, or wait, with reservations for jobs whose host cannot be placed
(orchestrator.scheduling.reservation; the cluster's room: orchestrator.scheduling.cluster_room).

Nothing is kept only in memory that a restarted scheduler would need: a job's host is its
`run_id`, and hosts are found again by listing them. A job is claimed in the database (one
guarded UPDATE per attempt: with several schedulers one wins) before a host admits it, so
an attempt never trains where no row points, nor on two hosts. A host that does not answer
costs only its own jobs: the tick goes on without it (`HostWatch._silent_host`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import replace

from core.host_protocol import (
    NO_ANSWER,
    AdmissionRequest,
    HostReport,
    HostShape,
    NodeRef,
    PackHosts,
)
from core.memory_estimate import SlotDemand
from core.objectstore import ObjectStore
from core.tinker_memory import reported_demands
from orchestrator.errors import InvalidTransition
from orchestrator.jobs import job_spec_for
from orchestrator.scheduling.admission import HostRoom, WaitingJob, plan_admissions
from orchestrator.scheduling.cluster_room import ClusterRoom
from orchestrator.scheduling.finish_estimate import FinishEstimates
from orchestrator.scheduling.host_watch import (
    HOST_ID_PREFIX,
    HostWatch,
    exclusive_host,
    job_log_context,
    runtime_left,
    warm_host,
)
from orchestrator.scheduling.outcomes import JobOutcomes
from orchestrator.scheduling.placement import (
    Resources,
    free_after_unplaced,
    host_spec,
)
from orchestrator.scheduling.reservation import (
    Reservations,
)
from orchestrator.scheduling.sizing import HostSizing, Nodes
from orchestrator.settings import Settings
from orchestrator.states import ACTIVE_RUN_STATUSES, JobStatus
from orchestrator.store import JobStore, new_id
from orchestrator.tables import JobRow

log = logging.getLogger(__name__)


class HostScheduling(HostWatch, ClusterRoom):
    """Both halves of a tick: `watch()` (orchestrator.scheduling.host_watch), then `launch()`
    (the cluster's room for new hosts: orchestrator.scheduling.cluster_room)."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        objects: ObjectStore,
        hosts: PackHosts,
        *,
        gpu_available: Callable[[], bool] = lambda: False,
        nodes: Nodes = tuple,  # the cluster's nodes' memory (memory_budget.ray_node_memory)
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.objects = objects
        self.hosts = hosts
        self._file_rows: dict[tuple[str, str], int] = {}  # files never change: read once
        self.sizing = HostSizing(
            settings, gpu_available, nodes=nodes, file_rows=self._training_file_rows
        )
        self.clock = clock
        self.outcomes = JobOutcomes(settings, store, objects, log, job_log_context)
        self.reports: dict[str, HostReport] = {}  # this tick's poll of every host
        self.unanswered: set[str] = set()  # hosts that did not answer this tick's poll
        # host -> polls it missed in a row (counted by time since the unanswered poll);
        # in memory on purpose: a restarted scheduler gives a slow host a fresh allowance
        self._missed_polls: dict[str, int] = {}
        self._first_seen: dict[str, float] = {}  # host -> when this scheduler first saw it
        self._admitted_at: dict[str, float] = {}  # host -> this scheduler's last admit there
        self._host_nodes: dict[str, NodeRef] = {}  # host -> its node (its last report)
        self.finish_estimates = FinishEstimates()  # each running job's recent steps
        # tenant -> when this scheduler last started one of its jobs (fairness's turn order)
        self._last_started: dict[str, float] = {}
        self._unplaceable: set[str] = set()  # shapes the cluster could not place a host of
        self.reservations = Reservations(settings.reserve_after_seconds)
        self._holding: dict[str, list[Resources]] = {}  # reserved shape -> its bundles
        self._closed: set[str] = set()  # hosts draining for a reservation
        self._requested: list[Resources] = []  # what the autoscaler was last asked for
        self._told_no_room: set[str] = set()  # queued jobs told their host fits nowhere
        # Host -> its jobs' demands at the last launch: the Tinker dispatcher counts them.
        self.job_demands: dict[str, list[SlotDemand]] = {}

    # ---- launch: place queued jobs ----
    def launch(self) -> None:
        queued = self.store.jobs_with_status([JobStatus.QUEUED])
        active = self.store.jobs_with_status(ACTIVE_RUN_STATUSES)
        self.reservations.keep({j.id for j in queued})
        shapes: dict[str, HostShape] = {}
        waiting = []
        for job in queued:
            shape = self.sizing.shape_of(job)
            if not self.sizing.estimable(shape):
                continue  # its base's sizes cannot be read now: it waits (logged once)
            shapes[shape.key] = shape
            waiting.append(
                WaitingJob(
                    job.id,
                    job.tenant,
                    shape.key,
                    job.created_at,
                    _priority(job),
                    self.sizing.demand_of(job),
                    exclusive=not wants_packing(job),
                    reserved=job.id in self.reservations.reserved_at,
                )
            )
        for job in active:
            shapes.setdefault(self.sizing.shape_of(job).key, self.sizing.shape_of(job))
        rooms = self._rooms(active)
        free = free_after_unplaced(self.hosts.free_resources(), self.reports.values())
        plan = plan_admissions(
            waiting,
            rooms,
            running_per_tenant=dict(Counter(j.tenant for j in active)),
            last_started=self._last_started,
            free_host_starts=self.settings.max_concurrent_runs - self._hosts_up(),
            max_slots=self.settings.max_slots_per_host,
            fits=lambda key, demands: self.sizing.fits(shapes[key], demands),
            new_host_id=lambda: new_id("host"),
            closed=self._hold_for_reservations(waiting, shapes, free),
        )
        for host_id in plan.retire:
            log.info(
                "ending idle pack host %s to make room",
                host_id,
                extra={"host_id": host_id, "run_id": host_id},
            )
            self.hosts.stop(host_id)
        by_id = {job.id: job for job in queued}
        for job_id in plan.never_fit:  # the backstop of the check at submission
            job = by_id[job_id]
            self.outcomes.fail(job, "insufficient_memory", self.sizing.never_fit_reason(job))
        started = set()
        unplaced = list(plan.unhosted)  # jobs left without a host they wanted
        no_room: set[str] = set()  # shapes whose host fits on no node's free resources
        started_shapes = []
        for start in plan.starts:
            left = self._placed(shapes[start.shape], free)
            shape = shapes[start.shape]
            if left is not None and self._start_host(start.host_id, shape, start.exclusive):
                free = left
                started.add(start.host_id)
                started_shapes.append(shape)
                self._holding.pop(start.shape, None)
            elif left is None:
                no_room.add(start.shape)
                unplaced += [j.job_id for j in plan.joins if j.host_id == start.host_id][:1]
        self._reserve(unplaced, by_id)
        hosted = set()
        for join in plan.joins:
            if join.host_id.startswith(HOST_ID_PREFIX) and (
                join.host_id in started or join.host_id in self.reports
            ):
                self.join(by_id[join.job_id], join.host_id)
                hosted.add(join.job_id)
        waiting_jobs = [job for job in queued if job.id not in hosted]
        self._ask_for_room(no_room, shapes, waiting_jobs, started_shapes)
        self._keep_warm_hosts(free, len(started))

    def _rooms(self, active: list[JobRow]) -> list[HostRoom]:
        demands: dict[str, list[SlotDemand]] = defaultdict(list)
        for job in active:
            demands[job.run_id or ""].append(self.sizing.demand_of(job))
        self.job_demands = dict(demands)
        return [
            HostRoom(
                host_id,
                report["shape"].key,
                report["max_slots"],
                demands=demands.get(host_id, []),
                # An exclusive host (a `packing: false` job's) takes no one else, ever.
                ending=report["ending"] or not report["alive"] or exclusive_host(report),
                warm=warm_host(report),
                tinker=reported_demands(report.get("request_models")),
            )
            for host_id, report in self.reports.items()
        ]

    def _start_host(
        self, host_id: str, shape: HostShape, exclusive: bool = False, *, warm: bool = False
    ) -> bool:
        spec = host_spec(
            self.settings,
            host_id,
            shape,
            warm=warm,
            exclusive=exclusive,
            memory_budget_bytes=self.sizing.spec_budget(shape),
        )
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
        """Claims the job in the database first (one scheduler wins each attempt), then
        admits it on the host, so no attempt ever trains on a host no row points to, nor
        on two hosts. A host that answers no gives the claim back (the attempt is not
        spent); one that does not answer keeps it: it may still take the job, and the
        watch requeues the job if it never shows there."""
        attempt = job.attempt + 1
        request = AdmissionRequest(
            job=replace(job_spec_for(job, self.settings), attempt=attempt),
            priority=_priority(job),
            memory_bytes=self.sizing.job_memory(job),
            # What is left of it: the host counts from its admission, the job's life from
            # its first start (the host ends it too if this scheduler is gone).
            max_runtime_seconds=_admitted_runtime(job, self.clock()),
            preemptions=job.preemptions,
        )
        held = self.reservations.age(job.id, self.clock())
        reserved = "" if held is None else f", after a reservation held {held:.0f} s"
        try:
            self.store.claim(
                job.id,
                job.attempt,
                host_id,
                f"Fine-tuning job started (attempt {attempt}, pack host {host_id}{reserved})",
                # What depends on the cluster is resolved now, once (core/job_settings.py).
                settings=self.sizing.launched(job),
            )
        except InvalidTransition:
            return  # cancelled meanwhile, or another scheduler claimed it
        result = self.hosts.admit(host_id, request)
        context = job_log_context(job, host_id, attempt)
        if result.admitted or result.reason == "already admitted":
            self._admitted_at[host_id] = self._last_started[job.tenant] = self.clock()
            log.info("job %s joined pack host %s", job.id, host_id, extra=context)
        elif result.reason == NO_ANSWER:
            log.warning(
                "pack host %s did not answer the admit of %s", host_id, job.id, extra=context
            )
        else:
            log.info(
                "pack host %s did not admit %s: %s", host_id, job.id, result.reason, extra=context
            )
            self.outcomes.guarded(
                self.store.unclaim,
                job.id,
                attempt,
                f"Pack host {host_id} did not take the job ({result.reason}); queued again, "
                f"attempt {attempt} not spent",
            )

    def _keep_warm_hosts(self, free: list[Resources], started: int) -> None:
        """Per base model, `warm_hosts` hosts of the default shape stay up with no job, in
        the room left once `started` hosts were started this tick."""
        room = self.settings.max_concurrent_runs - self._hosts_up() - started
        if not self.settings.warm_hosts:
            return
        # Warmth is what each host reports (its spec), so hosts adopted after a restart
        # count too, not only those this scheduler started.
        warm_now = Counter(
            r["shape"].base_model for r in self.reports.values() if warm_host(r) and r["alive"]
        )
        for base in sorted(self.settings.base_models):
            for _ in range(self.settings.warm_hosts - warm_now[base]):
                if room <= 0:
                    return
                shape = self.sizing.shape(base, self.settings.default_num_workers)
                left = self._placed(shape, free)
                if left is not None and self._start_host(new_id("host"), shape, warm=True):
                    room, free = room - 1, left

    def _training_file_rows(self, job: JobRow) -> int:
        """The rows of the job's training file (the memory estimate's dataset term)."""
        key = (job.tenant, job.training_file)
        if key not in self._file_rows:
            try:
                self._file_rows[key] = self.store.get_file(*key).examples
            except Exception:  # noqa: BLE001 - a file gone since: its job fails when it loads
                return 0
        return self._file_rows[key]


def _priority(job: JobRow) -> int:
    return job.priority or 0


def _admitted_runtime(job: JobRow, now: float) -> float | None:
    left = runtime_left(job, now)
    return None if left is None else max(left, 0.0)


def wants_packing(job: JobRow) -> bool:
    """False for a `training.packing: false` job: it trains on a host of its own."""
    return job.settings.packing
