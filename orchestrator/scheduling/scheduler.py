"""The scheduler loop: validates new jobs, watches runs, launches queued jobs.

Each tick first reconciles what is running with Ray (so a restarted scheduler adopts the
runs that survived it before it starts anything new), then fills free capacity.
"""

from __future__ import annotations

import fcntl
import logging
import threading
import time
from typing import IO, Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from core.host_protocol import PackHosts
from core.object_keys import ADAPTER_WEIGHTS, file_key
from core.objectstore import ObjectStore
from core.run_states import RunJobState
from orchestrator.errors import InvalidTransition
from orchestrator.jobs import run_spec_for
from orchestrator.metrics import (
    RUN_POLL_TIMEOUTS,
    Capacity,
    memory_by_shape,
    observe_training,
    record_capacity,
)
from orchestrator.scheduling.host_scheduling import HostScheduling, on_host
from orchestrator.scheduling.outcomes import JobOutcomes
from orchestrator.scheduling.packing import plan_packs, wants_packing
from orchestrator.scheduling.ray_runs import UNRESPONSIVE, RayRuns
from orchestrator.settings import Settings
from orchestrator.states import ACTIVE_RUN_STATUSES, JobStatus
from orchestrator.store import JobStore, new_id
from orchestrator.tables import JobRow

log = logging.getLogger(__name__)


def hold_single_scheduler_lock(database_url: str) -> IO[str] | None:
    """SQLite supports one scheduler: a second one on the same file refuses to start.

    PostgreSQL needs no lock: every claim is a guarded UPDATE that one scheduler wins.
    """
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    handle = open(f"{url.database}.scheduler.lock", "a+")  # noqa: SIM115 - held for life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RuntimeError(
            f"another scheduler already runs on the SQLite database {url.database}; SQLite "
            "supports one scheduler (use PostgreSQL, LORAFLEET_DATABASE_URL, for several)"
        ) from None
    return handle


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        objects: ObjectStore,
        runs: RayRuns,
        hosts: PackHosts | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.objects = objects
        self.runs = runs
        self.outcomes = JobOutcomes(settings, store, objects, log, job_context)
        # scheduling_mode "hosts": jobs join warm pack hosts (scheduling/host_scheduling.py);
        # "window": a run per pack of jobs arriving together; "solo": a run per job.
        self.host_mode: HostScheduling | None = None
        if settings.scheduling_mode == "hosts":
            self.host_mode = HostScheduling(
                settings,
                store,
                objects,
                hosts or _ray_hosts(settings),
                gpu_available=runs.gpu_available,
            )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Polls in a row each (job, attempt) went unanswered; in memory on purpose: a
        # restarted scheduler gives a slow run a fresh allowance.
        self._missed_polls: dict[tuple[str, int], int] = {}
        self._database_away = False
        # run id -> its jobs' polled states (or UNRESPONSIVE), from this tick's watch
        self._runs_seen: dict[str, list[Any]] = {}

    # ---- the loop ----
    def tick(self) -> None:
        self._watch_runs()
        if self.host_mode is not None:
            self.host_mode.watch()
        record_capacity(self.store, self.capacity())
        self._validate_new_jobs()
        if self.host_mode is not None:
            self.host_mode.launch()
        self._launch_queued()

    def run_forever(self) -> None:
        while not self._stop.is_set():
            self.tick_safely()
            self._stop.wait(self.settings.scheduler_poll_seconds)

    def tick_safely(self) -> bool:
        """One tick that never raises: the loop goes on and the next tick retries. Every
        change a tick makes is its own committed transaction, so a tick cut short by the
        database going away loses nothing already acknowledged. Returns whether it ran whole."""
        try:
            # Inside the loop: Ray may not be up yet, or may come back after a restart.
            self.runs.connect()
            self.tick()
        except DBAPIError as exc:
            if not self._database_away:  # logged once per outage, not once per tick
                log.error("database unavailable, retrying each tick: %s", exc.orig or exc)
            self._database_away = True
            return False
        except Exception:  # one bad tick must not end the loop; the next one retries
            log.exception("scheduler tick failed")
            return False
        if self._database_away:
            log.warning("database available again")
            self._database_away = False
        return True

    def start(self) -> None:
        self._lock = hold_single_scheduler_lock(self.settings.database_url)
        self._thread = threading.Thread(target=self.run_forever, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.runs.abandon_start()  # a Ray still starting (on a loaded machine, 30 s) ends now
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.runs.close()

    # ---- validating_files → queued ----
    def _validate_new_jobs(self) -> None:
        # Every line was checked on upload (and the run parses it again): here only that
        # the file is still stored, without downloading it on the scheduler's thread.
        for job in self.store.jobs_with_status([JobStatus.VALIDATING_FILES]):
            if not self.objects.exists(file_key(job.tenant, job.training_file)):
                message = f"training_file: {job.training_file} is no longer stored"
                self.outcomes.fail(job, "invalid_file", message, param="training_file")
                continue
            start = job.settings.get("from_checkpoint")
            if start and not self.objects.exists(start["adapter_prefix"] + ADAPTER_WEIGHTS):
                message = f"from_checkpoint: {start['checkpoint']} is no longer stored"
                self.outcomes.fail(job, "invalid_checkpoint", message, param="from_checkpoint")
                continue
            self.outcomes.guarded(self.store.queue, job.id, "Files validated; job queued")

    # ---- queued → running ----
    def _launch_queued(self) -> None:
        active = self.store.jobs_with_status(ACTIVE_RUN_STATUSES)
        queued = self.store.jobs_with_status([JobStatus.QUEUED])
        if self.host_mode is not None:  # hosts take the rest; these train alone
            # Each in a run of its own, within the same limits as hosts (what launch left).
            room, sizing = self.host_mode.room_for_runs, self.host_mode.sizing
            for job in queued:
                if not wants_packing(job) and room.take(sizing.shape_of(job)):
                    self._launch([job])
            return
        max_pack_size, window_s = pack_limits(self.settings)
        packs = plan_packs(
            queued,
            max_pack_size=max_pack_size,
            free_runs=self.settings.max_concurrent_runs - len({j.run_id for j in active}),
            now=time.time(),
            window_s=window_s,
        )
        for pack in packs:
            self._launch(pack)

    def _launch(self, pack: list[JobRow]) -> None:
        run_id = new_id("run")
        started = []
        for job in pack:
            try:
                started.append(
                    self.store.claim(
                        job.id,
                        job.attempt,
                        run_id,
                        f"Fine-tuning job started (attempt {job.attempt + 1}, run {run_id}, "
                        f"{len(pack)} job(s) in the pack)",
                    )
                )
            except InvalidTransition:
                continue  # cancelled meanwhile, or another scheduler took it
        if not started:
            return
        for job in started:
            log.info("job %s started in run %s", job.id, run_id, extra=job_context(job))
        use_gpu = started[0].settings["resources"]["use_gpu"]
        if use_gpu is None:
            use_gpu = self.runs.gpu_available()
        try:
            self.runs.launch(run_spec_for(run_id, started, self.settings, use_gpu))
        except Exception as exc:
            log.exception("launching run %s failed", run_id, extra={"run_id": run_id})
            for job in started:
                self.outcomes.retry_or_fail(job, f"could not start the run: {exc}")

    # ---- running → terminal ----
    def _watch_runs(self) -> None:
        active = self.store.jobs_with_status(ACTIVE_RUN_STATUSES)
        if self.host_mode is not None:  # jobs on pack hosts are the host mode's to watch
            active = [j for j in active if not on_host(j)]
        for job in active:
            assert job.run_id is not None
            if job.status == JobStatus.CANCELLING.value:
                self.runs.stop(job.run_id, job.id)
        polls = self.runs.poll_all([(j.run_id or "", j.id, j.event_cursor) for j in active])
        self._runs_seen = {}
        for job in active:
            polled = polls[job.id]
            if polled is not None:
                state = polled if isinstance(polled, str) else polled["state"]
                self._runs_seen.setdefault(job.run_id or "", []).append(state)
        for job in active:
            polled = polls[job.id]
            if polled == UNRESPONSIVE:
                self._run_unresponsive(job)
                continue
            self._missed_polls.pop((job.id, job.attempt), None)
            if polled is None:
                self._run_vanished(job)
                continue
            assert isinstance(polled, dict)
            if not self._store_events(job, polled):
                continue
            state = polled["state"]
            if state == RunJobState.SUCCEEDED:
                self._succeed(job)
            elif state == RunJobState.CANCELLED:
                self.outcomes.guarded(self.store.cancel, job.id, attempt=job.attempt)
            elif state == RunJobState.FAILED:
                code = polled.get("error_code") or "training_error"
                self.outcomes.fail(job, code, polled["error"] or "training failed")
        live = {j.run_id for j in self.store.jobs_with_status(ACTIVE_RUN_STATUSES) if j.run_id}
        self.runs.reap(live)

    def capacity(self) -> Capacity:
        """Runs (and pack hosts) by state, and the slots training a job, from this tick."""
        mode = "window" if self.settings.scheduling_mode == "window" else "solo"
        hosts: dict[tuple[str, str], int] = {}
        slots = 0
        for states in self._runs_seen.values():
            # A run that did not answer keeps its jobs' slots: it may only be busy.
            key = (mode, "unresponsive" if UNRESPONSIVE in states else "running")
            hosts[key] = hosts.get(key, 0) + 1
            slots += sum(s in (UNRESPONSIVE, RunJobState.RUNNING) for s in states)
        memory: dict[str, tuple[int, int]] = {}
        if self.host_mode is not None:
            on_hosts = self.host_mode.capacity()
            hosts.update(on_hosts.hosts)
            slots += on_hosts.slots_in_use
            memory = memory_by_shape(self.host_mode.reports.values())
        return Capacity(hosts, slots, memory)

    def _run_unresponsive(self, job: JobRow) -> None:
        """A run that did not answer this tick: its jobs stay running (it may only be busy),
        a warning lands once per stall, and after `max_run_poll_timeouts` polls in a row
        the run counts as lost to the infrastructure."""
        RUN_POLL_TIMEOUTS.inc()
        key = (job.id, job.attempt)
        missed = self._missed_polls.get(key, 0) + 1
        self._missed_polls[key] = missed
        limit = self.settings.max_run_poll_timeouts
        if missed == 1:
            log.warning("run %s did not answer a poll", job.run_id, extra=job_context(job))
            self.outcomes.guarded(
                self.store.warn,
                job.id,
                job.attempt,
                f"Run {job.run_id} did not answer within "
                f"{self.settings.run_poll_timeout_seconds:g} s; waiting for it "
                f"(requeued after {limit} missed polls in a row)",
                {"run_id": job.run_id, "missed_polls": missed},
            )
        if missed >= limit:
            del self._missed_polls[key]
            assert job.run_id is not None
            self.runs.kill(job.run_id)
            self.outcomes.retry_or_fail(job, f"its run did not answer {missed} polls in a row")

    def _store_events(self, job: JobRow, polled: dict[str, Any]) -> bool:
        tokens = None
        for event in polled["events"]:
            count = (event.get("data") or {}).get("trained_tokens")
            if event.get("type") == "metrics" and count is not None:
                tokens = count
        stored = self.store.record_run_events(
            job.id, job.attempt, polled["events"], polled["cursor"], trained_tokens=tokens
        )
        if stored:  # counted once: a fenced-off (stale) batch is not stored, nor counted
            observe_training(job.created_at, polled["events"])
        return stored

    def _run_vanished(self, job: JobRow) -> None:
        # Another scheduler may have claimed the job and not created its run yet.
        if job.started_at and time.time() - job.started_at < self.settings.run_start_grace_seconds:
            return
        if job.status == JobStatus.CANCELLING.value:
            self.outcomes.guarded(self.store.cancel, job.id, attempt=job.attempt)
            return
        self.outcomes.retry_or_fail(job, "its run disappeared from the Ray cluster")

    def _succeed(self, job: JobRow) -> None:
        self.outcomes.succeed(job)


def job_context(job: JobRow) -> dict[str, Any]:
    """`extra=` of a log call about one job (LORAFLEET_LOG_FORMAT=json prints these fields)."""
    return {"job_id": job.id, "run_id": job.run_id, "attempt": job.attempt, "tenant": job.tenant}


def pack_limits(settings: Settings) -> tuple[int, float]:
    """(most jobs per run, seconds a queued job waits for company) in this scheduling mode:
    "solo" runs every job alone at once; "window" (and the rare run beside hosts) packs."""
    if settings.scheduling_mode == "solo":
        return 1, 0.0
    return settings.max_pack_size, settings.pack_window_seconds


def _ray_hosts(settings: Settings) -> PackHosts:
    from orchestrator.scheduling.ray_hosts import RayHosts  # imported only in host mode

    return RayHosts(settings)
