"""Scheduling on pack hosts: queued jobs join warm pack hosts; one poll per host per tick.

Each tick, `watch()` polls every host and runs the watchdog (orchestrator.scheduling.host_watch);
then `launch()`, here, places queued jobs (orchestrator.scheduling.admission): join a
host, start one, or wait, with reservations for jobs whose host cannot be placed
(orchestrator.scheduling.reservation).

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
from typing import Any

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
from orchestrator.scheduling.finish_estimate import FinishEstimates
from orchestrator.scheduling.host_watch import HOST_ID_PREFIX, HostWatch, runtime_left
from orchestrator.scheduling.node_choice import autoscaler_request
from orchestrator.scheduling.outcomes import JobOutcomes
from orchestrator.scheduling.placement import (
    Resources,
    bundles_of,
    free_after_unplaced,
    host_spec,
)
from orchestrator.scheduling.reservation import (
    HostHolding,
    Reservations,
    hosts_to_close,
    place_beside,
)
from orchestrator.scheduling.sizing import HostSizing, Nodes
from orchestrator.settings import Settings
from orchestrator.states import ACTIVE_RUN_STATUSES, JobStatus
from orchestrator.store import JobStore, new_id
from orchestrator.tables import JobRow

log = logging.getLogger(__name__)


class HostScheduling(HostWatch):
    """Both halves of a tick: `watch()` (orchestrator.scheduling.host_watch), then `launch()`."""

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
        self.outcomes = JobOutcomes(settings, store, objects, log, _context)
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

    def _placed(self, shape: HostShape, free: list[Resources]) -> list[Resources] | None:
        """The free resources left once a host of `shape` is placed beside what
        reservations hold for other shapes; None (its jobs wait, logged once per shape
        while it lasts) if the cluster cannot place it now."""
        holding = [bundles for key, bundles in self._holding.items() if key != shape.key]
        left = place_beside(bundles_of(shape), free, holding)
        if left is None and shape.key not in self._unplaceable:
            log.info("no free resources for a %s pack host now; its jobs wait", shape.key)
        (self._unplaceable.add if left is None else self._unplaceable.discard)(shape.key)
        return left

    # ---- room the cluster lacks: ask its autoscaler (orchestrator.scheduling.node_choice) ----
    def _ask_for_room(
        self,
        no_room: set[str],
        shapes: dict[str, HostShape],
        waiting: list[JobRow],
        started: list[HostShape],
    ) -> None:
        """Shapes that fit on no node now: the autoscaler is asked for them (with the hosts
        up and those `started` this tick, since Ray's request is for the whole cluster), once
        per change; each of their `waiting` jobs is told once. With none left the request is
        withdrawn."""
        running = [bundles_of(r["shape"]) for r in self.reports.values() if r["alive"]]
        running += [bundles_of(shape) for shape in started]
        request = autoscaler_request(running, [bundles_of(shapes[k]) for k in sorted(no_room)])
        if request != self._requested:
            try:
                self.hosts.request_resources(request)
                self._requested = request
            except Exception:  # no autoscaler to ask is not the tick's failure
                log.exception("asking the autoscaler for %s failed", request)
        self._told_no_room &= {job.id for job in waiting}
        for job in waiting:
            shape = self.sizing.shape_of(job)
            if shape.key not in no_room or job.id in self._told_no_room:
                continue
            self._told_no_room.add(job.id)
            bundles = bundles_of(shape)
            self.outcomes.guarded(
                self.store.warn,
                job.id,
                job.attempt,
                f"No node has free resources for a {shape.key} pack host "
                f"({len(bundles)} × {bundles[0]}); asked the cluster's autoscaler for them: the "
                "job starts when a node has room",
                {"requested_bundles": bundles, "shape": shape.key},
            )

    # ---- reservations (orchestrator.scheduling.reservation) ----
    def _hold_for_reservations(
        self, waiting: list[WaitingJob], shapes: dict[str, HostShape], free: list[Resources]
    ) -> set[str]:
        """What this tick's reservations hold (kept in `_holding` for `_placed`), and the
        hosts that take no new job so they can start: returns those hosts."""
        oldest_first = sorted((w for w in waiting if w.reserved), key=lambda w: w.created_at)
        self._holding = {w.shape: bundles_of(shapes[w.shape]) for w in oldest_first}
        holdings = [
            HostHolding(
                host_id,
                report["shape"].key,
                bundles_of(report["shape"]),
                report["slots_in_use"],
                warm=_warm(report),
                ending=report["ending"],
            )
            for host_id, report in self.reports.items()
            if report["alive"]  # an ended one's workers are free already
        ]
        starts_left = self.settings.max_concurrent_runs - self._hosts_up()
        closed = hosts_to_close(self._holding, free, holdings, starts_left)
        for host_id in sorted(closed - self._closed):
            log.info(
                "pack host %s takes no new job: it drains for a reserved job",
                host_id,
                extra={"host_id": host_id, "run_id": host_id},
            )
        self._closed = closed
        return closed

    def _reserve(self, unplaced: list[str], by_id: dict[str, JobRow]) -> None:
        """Jobs whose host could not be placed this tick; one that has waited
        `reserve_after_seconds` reserves what it waits for (one event when it does)."""
        now = self.clock()
        for job_id in self.reservations.unplaced(unplaced, now):
            job = by_id[job_id]
            waited = now - self.reservations.waiting_since[job_id]
            shape = self.sizing.shape_of(job).key
            log.info("job %s reserves a %s pack host", job.id, shape, extra=_context(job))
            self.outcomes.guarded(
                self.store.warn,
                job.id,
                job.attempt,
                f"Waited {waited:.0f} s for the resources of a {shape} pack host; they are "
                "reserved for this job now: smaller jobs no longer start hosts in them, and "
                "hosts it needs take no new job until it starts",
                {"reserved_for": shape, "waited_seconds": round(waited, 1), "reserved_at": now},
            )

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
                ending=report["ending"] or not report["alive"] or _exclusive(report),
                warm=_warm(report),
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
        context = _context(job, host_id, attempt)
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
            r["shape"].base_model for r in self.reports.values() if _warm(r) and r["alive"]
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


def _priority(job: JobRow) -> int:
    return job.priority or 0


def _admitted_runtime(job: JobRow, now: float) -> float | None:
    left = runtime_left(job, now)
    return None if left is None else max(left, 0.0)


def wants_packing(job: JobRow) -> bool:
    """False for a `training.packing: false` job: it trains on a host of its own."""
    return job.settings.packing


def _exclusive(report: HostReport) -> bool:
    # .get: a host started by an older lorafleet (hosts outlive serve) does not say.
    return bool(report.get("exclusive", False))


def _warm(report: HostReport) -> bool:
    # .get: a host started by an older lorafleet (hosts outlive serve) does not say.
    return bool(report.get("warm", False))
