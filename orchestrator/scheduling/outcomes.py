"""What the scheduler does with a job whose pack host reached an outcome: succeed (after
verifying the published adapter), cancel, requeue or fail; `settle` is the one mapping of a
host's job state to the job's status. Each is a guarded change: a job that moved on
meanwhile (cancelled, fenced out) is left alone.

An object store that is away while a job's adapter is verified fails nothing: the job stays
running (one warning event) and a later tick verifies it once the store is back."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from core.objectstore import ObjectStore, ObjectStoreUnavailable
from core.run_states import RunJobState
from orchestrator.errors import InvalidTransition
from orchestrator.jobs import archive_published_adapter, fine_tuned_model_name
from orchestrator.results import store_results_file
from orchestrator.settings import Settings
from orchestrator.states import JobStatus
from orchestrator.store import JobStore
from orchestrator.tables import JobRow

LogContext = Callable[[JobRow], dict[str, Any]]  # `extra=` of a log line about a job
# After the store failed a verification, how long ticks leave it alone: each try holds the
# tick for the store's own retries (~30 s), which other jobs' polls would wait behind.
STORE_AWAY_PAUSE_S = 15.0


class JobOutcomes:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        objects: ObjectStore,
        log: logging.Logger,  # the scheduling's own logger
        context: LogContext,
    ) -> None:
        self.log = log
        self.settings = settings
        self.store = store
        self.objects = objects
        self.context = context
        self._store_away_since: float | None = None  # monotonic; None: the store answers
        self._waiting_for_store: set[str] = set()  # jobs told so in this outage

    def settle(self, job: JobRow, state: RunJobState, error: str | None, code: str | None) -> bool:
        """A job its host reports ended (`state` terminal): succeeded once its adapter is
        verified, cancelled, or failed with the host's code. False when nothing could be
        decided yet (the object store is away): the caller keeps the job for a later tick."""
        if state is RunJobState.SUCCEEDED:
            return self.succeed(job)
        if state is RunJobState.HANDED_BACK:
            self.handed_back(job, error or "Handed back")
        elif state is RunJobState.CANCELLED:
            self.guarded(
                self.store.cancel, job.id, attempt=job.attempt, result_files=self.results(job)
            )
        elif state is RunJobState.FAILED:
            self.fail(job, code or "training_error", error or "training failed")
        return True

    def succeed(self, job: JobRow) -> bool:
        """Verifies the published adapter, then succeeds (or fails) the job. False when the
        object store is away: nothing changed, and the caller keeps the job for a later tick."""
        now = time.monotonic()
        if self._store_away_since is not None and now - self._store_away_since < STORE_AWAY_PAUSE_S:
            return False
        try:
            problem = archive_published_adapter(self.objects, job)
        except ObjectStoreUnavailable as exc:
            self._store_away(job, exc)
            return False
        if self._store_away_since is not None:
            self.log.warning("object store available again")
            self._store_away_since = None
        self._waiting_for_store.discard(job.id)
        if problem:
            self.fail(job, "infrastructure", problem)
            return True
        self.log.info("job %s succeeded", job.id, extra=self.context(job))
        self.guarded(
            self.store.succeed,
            job.id,
            job.attempt,
            fine_tuned_model_name(job),
            "The job has successfully completed",
            self.results(job),
        )
        return True

    def _store_away(self, job: JobRow, error: ObjectStoreUnavailable) -> None:
        if self._store_away_since is None:  # logged once per outage, not once per tick
            self.log.error("object store unavailable; verifying adapters later: %s", error)
        self._store_away_since = time.monotonic()
        if job.id not in self._waiting_for_store:
            self._waiting_for_store.add(job.id)
            self.guarded(
                self.store.warn,
                job.id,
                job.attempt,
                "Object store unavailable; the published adapter is verified once it is back",
                {"error": str(error)},
            )

    def handed_back(self, job: JobRow, said: str) -> None:
        """The host checkpointed the job at a step boundary and gave it back (`said`: why and
        at which step): a pausing job is paused, a running one (its host drained) queued
        again, each with its attempt given back; a cancelling one is cancelled."""
        attempt = job.attempt
        if job.status == JobStatus.CANCELLING.value:
            self.guarded(self.store.cancel, job.id, attempt=attempt)
        elif job.status == JobStatus.PAUSING.value:
            self.log.info("job %s paused: %s", job.id, said, extra=self.context(job))
            self.guarded(self.store.pause, job.id, attempt, f"{said}; job paused")
        else:
            self.log.info("job %s handed back: %s", job.id, said, extra=self.context(job))
            self.guarded(
                self.store.hand_back,
                job.id,
                attempt,
                f"{said}; job requeued to continue from there (attempt {attempt} not spent)",
            )

    def retry_or_fail(self, job: JobRow, reason: str) -> None:
        """The job's run or host was lost: requeued (to resume from its last checkpoint)
        while attempts are left, cancelled if it was asked to stop anyway, paused (from its
        newest checkpoint, the attempt spent) if it was asked to pause, else failed."""
        if job.status == JobStatus.CANCELLING.value:
            self.guarded(self.store.cancel, job.id, attempt=job.attempt)
        elif job.status == JobStatus.PAUSING.value:
            message = f"Run lost while pausing ({reason}); paused at its newest checkpoint"
            self.guarded(self.store.pause, job.id, job.attempt, message, spent=True)
        elif job.attempt < self.settings.max_attempts:
            self.log.warning("job %s requeued: %s", job.id, reason, extra=self.context(job))
            self.guarded(self.store.requeue, job.id, job.attempt, reason)
        else:
            self.fail(job, "infrastructure", f"{reason}; gave up after {job.attempt} attempts")

    def preempted(self, job: JobRow, reason: str) -> None:
        """The job's host was lost with its node, and the cluster says the node was preempted
        (`reason` says which): requeued spending one of the job's own preemptions
        (`max_preemptions_per_job`), not an attempt; past that budget it fails. A job asked
        to stop or pause anyway is cancelled or paused, its attempt given back too."""
        budget = self.settings.max_preemptions_per_job
        count = job.preemptions + 1
        if job.status == JobStatus.CANCELLING.value:
            self.guarded(self.store.cancel, job.id, attempt=job.attempt)
        elif job.status == JobStatus.PAUSING.value:
            message = f"Run lost while pausing ({reason}); paused at its newest checkpoint"
            self.guarded(self.store.pause, job.id, job.attempt, message)
        elif count <= budget:
            self.log.warning("job %s preempted: %s", job.id, reason, extra=self.context(job))
            message = (
                f"Run lost ({reason}): preempted ({count} of {budget}; no attempt spent); "
                "job requeued to resume from its last checkpoint"
            )
            data = {"preempted": True, "preemption": count, "max_preemptions": budget}
            self.guarded(self.store.requeue_preempted, job.id, job.attempt, message, data)
        else:
            self.fail(
                job,
                "infrastructure",
                f"{reason}; preempted {count} time{'s' * (count != 1)}, past the job's "
                f"preemption budget (max_preemptions_per_job = {budget})",
            )

    def fail(self, job: JobRow, code: str, message: str, param: str | None = None) -> None:
        self.log.warning("job %s failed (%s): %s", job.id, code, message, extra=self.context(job))
        self.guarded(
            self.store.fail,
            job.id,
            code,
            message,
            param=param,
            attempt=job.attempt,
            result_files=self.results(job),
        )

    def results(self, job: JobRow) -> list[str]:
        """The job's results file (orchestrator/results.py), written as it ends; none when
        it cannot be (the job's outcome does not wait for it: logged)."""
        try:
            return store_results_file(self.store, self.objects, job)
        except Exception:  # noqa: BLE001 - a missing results file fails no job
            self.log.exception(
                "results file of job %s not written", job.id, extra=self.context(job)
            )
            return []

    def guarded(self, operation: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            operation(*args, **kwargs)
        except InvalidTransition as exc:
            self.log.info("skipped: %s", exc)
