"""The scheduler's host mode: queued jobs join warm pack hosts; one poll per host per tick.

Each tick, `watch()` polls every host once (all its jobs' states and new events in one
call), stores each job's events, finishes the jobs that ended, and runs the watchdog: a
job past its `max_runtime` fails with `timeout`; a host with jobs and no step for
`step_timeout_seconds` is ended and its jobs are requeued, to resume from their
checkpoints on another host (never a silent hang). Then `launch()` places queued jobs
(orchestrator.scheduling.admission): join a host, start one, or wait.

Nothing is kept only in memory that a restarted scheduler would need: a job's host is its
`run_id`, and hosts are found again by listing them. A job is claimed in the database (one
guarded UPDATE per attempt: with several schedulers one wins) before a host admits it, so
an attempt never trains where no row points, nor on two hosts. A host that does not answer
costs only its own jobs: the tick goes on without it (`_silent_host`).
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
    SETUP_PHASES,
    AdmissionRequest,
    HostReport,
    HostShape,
    PackHosts,
    Unanswered,
)
from core.memory_estimate import SlotDemand
from core.objectstore import ObjectStore
from core.run_states import RunJobState
from orchestrator.errors import InvalidTransition
from orchestrator.jobs import job_spec_for
from orchestrator.metrics import RUN_POLL_TIMEOUTS, Capacity, observe_training
from orchestrator.scheduling.admission import HostRoom, WaitingJob, plan_admissions
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

HOST_ID_PREFIX = "host-"  # new_id("host"): a job's run_id in host mode


class HostScheduling:
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
        # tenant -> when this scheduler last started one of its jobs (fairness's turn order)
        self._last_started: dict[str, float] = {}
        self._unplaceable: set[str] = set()  # shapes the cluster could not place a host of
        self.reservations = Reservations(settings.reserve_after_seconds)
        self._holding: dict[str, list[Resources]] = {}  # reserved shape -> its bundles
        self._closed: set[str] = set()  # hosts draining for a reservation

    # ---- watch: one poll per host ----
    def watch(self) -> None:
        active = [j for j in self.store.jobs_with_status(ACTIVE_RUN_STATUSES) if on_host(j)]
        by_host: dict[str, list[JobRow]] = defaultdict(list)
        for job in active:
            by_host[job.run_id or ""].append(job)
        alive = set(self.hosts.list_hosts())
        answers = self.hosts.poll_all(
            {h: {j.id: j.event_cursor for j in by_host.get(h, [])} for h in sorted(alive)}
        )
        self.reports, self.unanswered = {}, set()
        for host_id in sorted(alive | set(by_host)):
            jobs = by_host.get(host_id, [])
            report = answers.get(host_id)
            if isinstance(report, Unanswered):
                self.unanswered.add(host_id)
                self._silent_host(host_id, report, jobs)
                continue
            self._missed_polls.pop(host_id, None)  # answered: a next stall counts afresh
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

    def _silent_host(self, host_id: str, unanswered: Unanswered, jobs: list[JobRow]) -> None:
        """A host that did not answer its poll: its jobs stay running (it may only be slow),
        each gets one warning event per stall, and once it has been silent for
        `max_run_poll_timeouts` poll timeouts in a row it is ended and its jobs requeue.
        Nothing else waits for it: the tick goes on with the other hosts."""
        timeout = self.settings.run_poll_timeout_seconds
        limit = self.settings.max_run_poll_timeouts
        missed = max(1, int((self.clock() - unanswered.since) / timeout))
        counted = self._missed_polls.get(host_id, 0)
        RUN_POLL_TIMEOUTS.inc(max(0, missed - counted))
        self._missed_polls[host_id] = max(missed, counted)
        if not counted:
            log.warning(
                "pack host %s did not answer a poll within %g s",
                host_id,
                timeout,
                extra={"host_id": host_id, "run_id": host_id},
            )
            for job in jobs:
                self.outcomes.guarded(
                    self.store.warn,
                    job.id,
                    job.attempt,
                    f"Pack host {host_id} did not answer within {timeout:g} s; waiting for "
                    f"it (its jobs are requeued after {limit} missed polls in a row)",
                    {"host_id": host_id, "missed_polls": missed},
                )
        if missed < limit:
            return
        del self._missed_polls[host_id]
        log.warning(
            "pack host %s did not answer %d polls in a row; ending it",
            host_id,
            missed,
            extra={"host_id": host_id, "run_id": host_id},
        )
        self.hosts.kill(host_id)
        for job in jobs:
            self.outcomes.retry_or_fail(
                job, f"its pack host {host_id} did not answer {missed} polls in a row"
            )

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
            if not self.outcomes.succeed(job):
                return  # the store is away: the host keeps the job for a later tick
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
        stop the ones still training (their job moved on: timed out, requeued). A job is
        claimed before it is admitted, so one admitted by another scheduler since this
        tick read the jobs is in the database already (read again here)."""
        for job_id, polled in report["jobs"].items():
            if job_id in ours:
                continue
            if polled["state"] is not RunJobState.RUNNING:
                self.hosts.release(host_id, job_id)
                continue
            current = self._row(job_id)
            if current is not None and current.attempt > polled["attempt"]:
                self.hosts.fence(host_id, job_id, current.attempt)  # a stale attempt leaves
            elif current is None or current.run_id != host_id:
                self.hosts.stop(host_id, job_id)

    def _hosts_up(self) -> int:
        """Hosts up as of this tick's poll, a silent one included (it holds its workers)."""
        return len(self.reports) + len(self.unanswered)

    def capacity(self) -> Capacity:
        """Pack hosts by state and the slots they report in use, from this tick's poll."""
        hosts = Counter(("hosts", _host_state(r)) for r in self.reports.values())
        hosts.update(("hosts", "unresponsive") for _ in self.unanswered)
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
            timeout = max(timeout, host_start_allowance(self.settings))
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
        left = runtime_left(job, self.clock())
        return left is not None and left < 0

    # ---- launch: place queued jobs ----
    def launch(self) -> None:
        queued = self.store.jobs_with_status([JobStatus.QUEUED])
        active = self.store.jobs_with_status(ACTIVE_RUN_STATUSES)
        self.reservations.keep({j.id for j in queued})
        shapes: dict[str, HostShape] = {}
        waiting = []
        for job in queued:
            shape = self.sizing.shape_of(job)
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
        for start in plan.starts:
            left = self._placed(shapes[start.shape], free)
            shape = shapes[start.shape]
            if left is not None and self._start_host(start.host_id, shape, start.exclusive):
                free = left
                started.add(start.host_id)
                self._holding.pop(start.shape, None)
            elif left is None:
                unplaced += [j.job_id for j in plan.joins if j.host_id == start.host_id][:1]
        self._reserve(unplaced, by_id)
        for join in plan.joins:
            if join.host_id.startswith(HOST_ID_PREFIX) and (
                join.host_id in started or join.host_id in self.reports
            ):
                self.join(by_id[join.job_id], join.host_id)
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
        return [
            HostRoom(
                host_id,
                report["shape"].key,
                report["max_slots"],
                demands=demands.get(host_id, []),
                # An exclusive host (a `packing: false` job's) takes no one else, ever.
                ending=report["ending"] or not report["alive"] or _exclusive(report),
                warm=_warm(report),
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

    # ---- outcomes (orchestrator.scheduling.outcomes: each a guarded change) ----
    def _host_lost(self, job: JobRow, reason: str) -> None:
        started = job.started_at or 0
        if self.clock() - started < self.settings.run_start_grace_seconds:
            return  # claimed a moment ago: its admission may not be visible yet
        self.outcomes.retry_or_fail(job, reason)

    def _training_file_rows(self, job: JobRow) -> int:
        """The rows of the job's training file (the memory estimate's dataset term)."""
        key = (job.tenant, job.training_file)
        if key not in self._file_rows:
            try:
                self._file_rows[key] = self.store.get_file(*key).examples
            except Exception:  # noqa: BLE001 - a file gone since: its job fails when it loads
                return 0
        return self._file_rows[key]

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


def runtime_left(job: JobRow, now: float) -> float | None:
    """Seconds left of the job's `max_runtime` (None: no limit), counted from its first
    start across every attempt: a job requeued after a lost host does not start afresh."""
    limit = _max_runtime(job)
    if limit is None:
        return None
    first = job.first_started_at or job.started_at
    return limit if first is None else limit - (now - first)


def _admitted_runtime(job: JobRow, now: float) -> float | None:
    left = runtime_left(job, now)
    return None if left is None else max(left, 0.0)


def host_start_allowance(settings: Settings) -> float:
    """The watchdog's least wait for a host's first step: each setup phase of its workers
    may take `setup_timeout_seconds` (the host fails its jobs past that itself), and the
    worker group's own start one more."""
    return settings.setup_timeout_seconds * (len(SETUP_PHASES) + 1)


def _event(event: Any) -> dict[str, Any]:
    level = "error" if event["type"] == "job_failed" else "info"
    return {
        "type": event["type"],
        "message": event["message"],
        "level": level,
        "data": event["data"],
    }


def wants_packing(job: JobRow) -> bool:
    """False for a `training.packing: false` job: it trains on a host of its own."""
    return job.settings.packing


def _exclusive(report: HostReport) -> bool:
    # .get: a host started by an older lorafleet (hosts outlive serve) does not say.
    return bool(report.get("exclusive", False))


def _warm(report: HostReport) -> bool:
    # .get: a host started by an older lorafleet (hosts outlive serve) does not say.
    return bool(report.get("warm", False))
