"""The scheduler loop: validates new jobs, watches the pack hosts, places queued jobs.

Each tick first reconciles what is running with Ray (so a restarted scheduler adopts the
hosts that survived it before it starts anything new), then fills free capacity. Every job
trains on a pack host (`host_scheduling`); a `packing: false` job on one of its own.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from core.host_protocol import HostReport, PackHosts
from core.memory_estimate import SlotDemand
from core.object_keys import ADAPTER_WEIGHTS, file_key
from core.objectstore import ObjectStore, ObjectStoreUnavailable
from orchestrator.merges import MergeRunner, MergeScheduling
from orchestrator.metrics import Capacity, memory_by_shape, record_capacity
from orchestrator.scheduling.host_scheduling import HostScheduling
from orchestrator.scheduling.outcomes import JobOutcomes
from orchestrator.scheduling.ray_connection import RayConnection
from orchestrator.scheduling.ray_nodes import ray_node_memory
from orchestrator.settings import Settings
from orchestrator.states import JobStatus
from orchestrator.store import JobStore
from orchestrator.store.merges import merge_store
from orchestrator.tables import JobRow
from orchestrator.tinker.dispatch import TinkerDispatcher
from orchestrator.tinker.sampling import SampleDispatch
from orchestrator.tinker.store import TinkerStore

log = logging.getLogger(__name__)


# Between ticks the loop waits for a wake-up, the poll interval at most: a new job (the
# store's, from any process on PostgreSQL: orchestrator.store.changes) or a host's news (a
# job's first step, its end: `PackHosts.wait_for_news`, waited for on a thread of its own
# in rounds of this many seconds, so a host started meanwhile is heard from soon).
NEWS_ROUND_S = 0.5
LOCK_POLL_S = 0.2  # how often a scheduler waiting for the SQLite lock tries again
LOCK_REMIND_S = 60.0  # and how often it says again whom it waits for
STOP_JOIN_S = 5.0  # how long a stop waits for a tick under way before ending Ray beneath it


def hold_single_scheduler_lock(
    database_url: str, stop: threading.Event | None = None
) -> IO[str] | None:
    """SQLite supports one scheduler per database: a second one on the same file waits until
    the first has exited (a serve restarted while the old one still shuts down), saying
    which process it waits for, and returns the held lock. None: PostgreSQL, which needs no
    lock (every claim is a guarded UPDATE that one scheduler wins), or `stop` was set while
    waiting."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    path = f"{url.database}.scheduler.lock"
    handle = open(path, "a+")  # noqa: SIM115 - held for the scheduler's life
    told_at: float | None = None
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            now = time.monotonic()
            if told_at is None or now - told_at >= LOCK_REMIND_S:
                log.warning(
                    "waiting for the scheduler lock held by pid %s: SQLite supports one "
                    "scheduler per database (%s); this one starts when that one exits (use "
                    "PostgreSQL, LORAFLEET_DATABASE_URL, for several at once)",
                    _lock_holder(path),
                    url.database,
                )
                told_at = now
            if (stop or threading.Event()).wait(LOCK_POLL_S):  # no `stop`: waits for good
                handle.close()
                return None
    if told_at is not None:
        log.warning("scheduler lock acquired; scheduling")
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))  # whom a scheduler that waits says it waits for
    handle.flush()
    return handle


def _lock_holder(path: str) -> str:
    try:
        return Path(path).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        objects: ObjectStore,
        ray: RayConnection,
        hosts: PackHosts | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.objects = objects
        self.ray = ray
        self.outcomes = JobOutcomes(settings, store, objects, log, job_context)
        self.host_scheduling = HostScheduling(
            settings,
            store,
            objects,
            hosts or _ray_hosts(settings),
            gpu_available=ray.gpu_available,
            # What memory each host may fill comes from the cluster's nodes (on Ray only).
            nodes=ray_node_memory if hosts is None else tuple,
        )
        self._stop = threading.Event()
        # Tinker requests to and from pack hosts (issue 21), on a thread of its own that
        # starts with the loop (one scheduler's, once it holds the lock); on Ray only.
        self.tinker = (
            TinkerDispatcher(
                TinkerStore(store.engine, store.changes),  # new rows wake it at once
                lambda: dict(self.host_scheduling.reports),
                settings.ray_namespace,
                sampling=SampleDispatch(  # completions and Tinker samples (issue 21)
                    TinkerStore(store.engine, store.changes),
                    dict(settings.base_models),
                    settings.object_store_config,
                    str(Path(settings.model_cache_dir or "models").resolve()),
                    settings.ray_namespace,
                ),
                room=self._tinker_room,  # a new model only where it fits (by memory)
            )
            if hosts is None
            else None
        )
        # Merged weights (orchestrator/merges.py): Ray tasks beside the hosts; on Ray only.
        self.merges = (
            MergeScheduling(
                settings,
                store,
                merge_store(store.engine),
                objects,
                _ray_merges(settings, self.host_scheduling.hosts),
            )
            if hosts is None
            else None
        )
        self._wake = threading.Event()  # set: tick now, not at the end of the poll interval
        self._thread: threading.Thread | None = None
        self._news_thread: threading.Thread | None = None
        self._hosts_on_ray = hosts is None  # news is asked of Ray's hosts once connected
        self._lock: IO[str] | None = None  # SQLite's one-scheduler lock, once held
        self._store_away = False  # the object store failed the last tick (logged once)
        self._database_away = False

    # ---- the loop ----
    def tick(self) -> None:
        self.host_scheduling.watch()
        record_capacity(self.store, self.capacity())
        self._validate_new_jobs()
        self.host_scheduling.launch()
        if self.merges is not None:
            self.merges.tick()

    def run_forever(self) -> None:
        # Waits here, not in start(): the API serves meanwhile, and a stop ends the wait.
        self._lock = hold_single_scheduler_lock(self.settings.database_url, self._stop)
        if self.tinker is not None and not self._stop.is_set():
            self.tinker.start()
        self._news_thread = threading.Thread(
            target=self._hear_from_hosts, name="host-news", daemon=True
        )
        self._news_thread.start()
        with self.store.changes.on_new_jobs(self._wake.set):
            while not self._stop.is_set():
                self._wake.clear()  # a wake-up during the tick means one more tick at once
                self.tick_safely()
                self._wake.wait(self.settings.scheduler_poll_seconds)

    def _hear_from_hosts(self) -> None:
        """Wakes the loop when a host has news (`PackHosts.wait_for_news`): a job's first
        step reaches the database within a tick, not a poll interval."""
        failing = False
        while not self._stop.is_set():
            if self._hosts_on_ray and not self.ray.connected():
                self._stop.wait(NEWS_ROUND_S)  # the loop's first tick connects
                continue
            try:
                if self.host_scheduling.hosts.wait_for_news(NEWS_ROUND_S):
                    self._wake.set()
                failing = False
            except Exception as exc:  # the tick's poll still runs; said once per failure
                if not failing and not self._stop.is_set():
                    log.warning("asking pack hosts for news failed (polls only): %s", exc)
                failing = True
                self._stop.wait(self.settings.scheduler_poll_seconds)

    def tick_safely(self) -> bool:
        """One tick that never raises: the loop goes on and the next tick retries. Every
        change a tick makes is its own committed transaction, so a tick cut short by the
        database going away loses nothing already acknowledged. Returns whether it ran whole."""
        try:
            # Inside the loop: Ray may not be up yet, or may come back after a restart.
            self.ray.connect()
            self.tick()
        except DBAPIError as exc:
            if not self._database_away:  # logged once per outage, not once per tick
                log.error("database unavailable, retrying each tick: %s", exc.orig or exc)
            self._database_away = True
            return False
        except ObjectStoreUnavailable as exc:  # likewise (a job's files checked, say)
            if not self._store_away:
                log.error("object store unavailable, retrying each tick: %s", exc)
            self._store_away = True
            return False
        except Exception as exc:  # one bad tick must not end the loop; the next one retries
            if self._stop.is_set():  # Ray ended beneath a tick cut short by the stop
                log.info("scheduler tick cut short by the stop: %s", exc)
            else:
                log.exception("scheduler tick failed")
            return False
        if self._database_away:
            log.warning("database available again")
            self._database_away = False
        if self._store_away:
            log.warning("object store available again")
            self._store_away = False
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops within seconds: the loop ends at once (a tick under way gets `STOP_JOIN_S`
        to finish), then the data dir's Ray is ended; the lock goes once the loop has."""
        self._stop.set()
        if self.tinker is not None:  # out of Ray's calls before Ray ends
            self.tinker.stop()
        self._wake.set()
        self.ray.abandon_start()  # a Ray still starting (on a loaded machine, 30 s) ends now
        if self._thread is not None:
            self._thread.join(timeout=STOP_JOIN_S)
        if self._news_thread is not None:  # out of Ray's calls before Ray ends
            self._news_thread.join(timeout=STOP_JOIN_S)
        self.ray.close()
        if self._lock is not None and not (self._thread and self._thread.is_alive()):
            self._lock.close()  # a scheduler waiting for it may start now
            self._lock = None

    # ---- validating_files → queued ----
    def _validate_new_jobs(self) -> None:
        # Every line was checked on upload (and the host parses it again): here only that
        # the file is still stored, without downloading it on the scheduler's thread.
        for job in self.store.jobs_with_status([JobStatus.VALIDATING_FILES]):
            if not self.objects.exists(file_key(job.tenant, job.training_file)):
                message = f"training_file: {job.training_file} is no longer stored"
                self.outcomes.fail(job, "invalid_file", message, param="training_file")
                continue
            start = job.settings.from_checkpoint
            if start and not self.objects.exists(start.adapter_prefix + ADAPTER_WEIGHTS):
                message = f"from_checkpoint: {start.checkpoint} is no longer stored"
                self.outcomes.fail(job, "invalid_checkpoint", message, param="from_checkpoint")
                continue
            self.outcomes.guarded(self.store.queue, job.id, "Files validated; job queued")

    def _tinker_room(self, host_id: str, report: HostReport, adding: Sequence[SlotDemand]) -> bool:
        """Whether new Tinker models fit on a host beside its jobs (as of the last launch)
        and the Tinker models it reports: the rule its jobs are admitted by."""
        jobs = self.host_scheduling.job_demands.get(host_id, [])
        return self.host_scheduling.sizing.room_for_tinker(report, jobs, adding)

    def capacity(self) -> Capacity:
        """Pack hosts by state, the slots training a job and memory by shape, this tick."""
        on_hosts = self.host_scheduling.capacity()
        memory = memory_by_shape(self.host_scheduling.reports.values())
        return Capacity(on_hosts.hosts, on_hosts.slots_in_use, memory)


def job_context(job: JobRow) -> dict[str, Any]:
    """`extra=` of a log call about one job (LORAFLEET_LOG_FORMAT=json prints these fields)."""
    return {"job_id": job.id, "run_id": job.run_id, "attempt": job.attempt, "tenant": job.tenant}


def _ray_hosts(settings: Settings) -> PackHosts:
    from orchestrator.scheduling.ray_hosts import RayHosts  # imports Ray: only when used

    return RayHosts(settings)


def _ray_merges(settings: Settings, hosts: PackHosts) -> MergeRunner:
    from orchestrator.scheduling.ray_merges import RayMerges  # imports Ray: only when used

    return RayMerges(settings, hosts.nodes)  # type: ignore[attr-defined]  # RayHosts's
