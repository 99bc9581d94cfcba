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

from core.layout import ADAPTER_WEIGHTS, file_key
from core.objectstore import ObjectStore
from core.publish import PublishError, store_adapter_archive, verify_adapter
from core.run_states import RunJobState
from orchestrator.errors import InvalidTransition
from orchestrator.jobs import fine_tuned_model_name, run_spec_for
from orchestrator.models import JobRow
from orchestrator.packing import plan_packs
from orchestrator.runs import RayRuns
from orchestrator.settings import Settings
from orchestrator.states import ACTIVE_RUN_STATUSES, JobStatus
from orchestrator.store import JobStore, new_id, now

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
        self, settings: Settings, store: JobStore, objects: ObjectStore, runs: RayRuns
    ) -> None:
        self.settings = settings
        self.store = store
        self.objects = objects
        self.runs = runs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the loop ----
    def tick(self) -> None:
        self._watch_runs()
        self._validate_new_jobs()
        self._launch_queued()

    def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                # Inside the loop: Ray may not be up yet, or may come back after a restart.
                self.runs.connect()
                self.tick()
            except Exception:  # one bad tick must not end the loop; the next one retries
                log.exception("scheduler tick failed")
            self._stop.wait(self.settings.scheduler_poll_seconds)

    def start(self) -> None:
        self._lock = hold_single_scheduler_lock(self.settings.database_url)
        self._thread = threading.Thread(target=self.run_forever, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- validating_files → queued ----
    def _validate_new_jobs(self) -> None:
        # Every line was checked on upload (and the run parses it again): here only that
        # the file is still stored, without downloading it on the scheduler's thread.
        for job in self.store.jobs_with_status([JobStatus.VALIDATING_FILES]):
            if not self.objects.exists(file_key(job.tenant, job.training_file)):
                message = f"training_file: {job.training_file} is no longer stored"
                self._fail(job, "invalid_file", message, param="training_file")
                continue
            start = job.settings.get("from_checkpoint")
            if start and not self.objects.exists(start["adapter_prefix"] + ADAPTER_WEIGHTS):
                message = f"from_checkpoint: {start['checkpoint']} is no longer stored"
                self._fail(job, "invalid_checkpoint", message, param="from_checkpoint")
                continue
            self._move(job, JobStatus.QUEUED, "Files validated; job queued")

    # ---- queued → running ----
    def _launch_queued(self) -> None:
        active = self.store.jobs_with_status(ACTIVE_RUN_STATUSES)
        packs = plan_packs(
            self.store.jobs_with_status([JobStatus.QUEUED]),
            max_pack_size=self.settings.max_pack_size,
            free_runs=self.settings.max_concurrent_runs - len({j.run_id for j in active}),
            now=time.time(),
            window_s=self.settings.pack_window_seconds,
        )
        for pack in packs:
            self._launch(pack)

    def _launch(self, pack: list[JobRow]) -> None:
        run_id = new_id("run")
        started = []
        for job in pack:
            try:
                started.append(
                    self.store.transition(
                        job.id,
                        JobStatus.RUNNING,
                        f"Fine-tuning job started (attempt {job.attempt + 1}, run {run_id}, "
                        f"{len(pack)} job(s) in the pack)",
                        expected_attempt=job.attempt,
                        attempt=JobRow.attempt + 1,
                        run_id=run_id,
                        started_at=now(),
                        event_cursor=0,
                    )
                )
            except InvalidTransition:
                continue  # cancelled meanwhile, or another scheduler took it
        if not started:
            return
        use_gpu = started[0].settings["resources"]["use_gpu"]
        if use_gpu is None:
            use_gpu = self.runs.gpu_available()
        try:
            self.runs.launch(run_spec_for(run_id, started, self.settings, use_gpu))
        except Exception as exc:
            log.exception("launching run %s failed", run_id)
            for job in started:
                self._retry_or_fail(job, f"could not start the run: {exc}")

    # ---- running → terminal ----
    def _watch_runs(self) -> None:
        active = self.store.jobs_with_status(ACTIVE_RUN_STATUSES)
        for job in active:
            assert job.run_id is not None
            if job.status == JobStatus.CANCELLING.value:
                self.runs.stop(job.run_id, job.id)
            polled = self.runs.poll(job.run_id, job.id, job.event_cursor)
            if polled is None:
                self._run_vanished(job)
                continue
            if not self._store_events(job, polled):
                continue
            state = polled["state"]
            if state == RunJobState.SUCCEEDED:
                self._succeed(job)
            elif state == RunJobState.CANCELLED:
                self._move(job, JobStatus.CANCELLED, "Job cancelled", finished_at=now())
            elif state == RunJobState.FAILED:
                code = polled.get("error_code") or "training_error"
                self._fail(job, code, polled["error"] or "training failed")
        live = {j.run_id for j in self.store.jobs_with_status(ACTIVE_RUN_STATUSES) if j.run_id}
        self.runs.reap(live)

    def _store_events(self, job: JobRow, polled: dict[str, Any]) -> bool:
        values: dict[str, Any] = {}
        for event in polled["events"]:
            tokens = (event.get("data") or {}).get("trained_tokens")
            if event.get("type") == "metrics" and tokens is not None:
                values["trained_tokens"] = tokens
        return self.store.record_run_events(
            job.id, job.attempt, polled["events"], polled["cursor"], **values
        )

    def _succeed(self, job: JobRow) -> None:
        try:
            verify_adapter(self.objects, job.tenant, job.id)
            store_adapter_archive(self.objects, job.tenant, job.id, mtime=now())
        except PublishError as exc:
            self._fail(job, "infrastructure", f"adapter was not published whole: {exc}")
            return
        self._move(
            job,
            JobStatus.SUCCEEDED,
            "The job has successfully completed",
            finished_at=now(),
            fine_tuned_model=fine_tuned_model_name(job),
        )

    def _run_vanished(self, job: JobRow) -> None:
        # Another scheduler may have claimed the job and not created its run yet.
        if job.started_at and time.time() - job.started_at < self.settings.run_start_grace_seconds:
            return
        if job.status == JobStatus.CANCELLING.value:
            self._move(job, JobStatus.CANCELLED, "Job cancelled", finished_at=now())
            return
        self._retry_or_fail(job, "its run disappeared from the Ray cluster")

    def _retry_or_fail(self, job: JobRow, reason: str) -> None:
        if job.attempt < self.settings.max_attempts:
            self._move(job, JobStatus.QUEUED, f"Run lost ({reason}); job requeued", level="warn")
        else:
            self._fail(job, "infrastructure", f"{reason}; gave up after {job.attempt} attempts")

    # ---- guarded moves (a job that moved on meanwhile is left alone) ----
    def _move(self, job: JobRow, target: JobStatus, message: str, **values: Any) -> None:
        try:
            self.store.transition(job.id, target, message, expected_attempt=job.attempt, **values)
        except InvalidTransition as exc:
            log.info("skipped: %s", exc)

    def _fail(self, job: JobRow, code: str, message: str, param: str | None = None) -> None:
        self._move(
            job,
            JobStatus.FAILED,
            f"Job failed: {message}",
            level="error",
            finished_at=now(),
            error_code=code,
            error_message=message,
            error_param=param,
        )
