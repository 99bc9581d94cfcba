"""What the scheduler does with a job whose run or pack host reached an outcome, in every
scheduling mode: succeed (after verifying the published adapter), requeue or fail. Each is a
guarded change: a job that moved on meanwhile (cancelled, fenced out) is left alone."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from core.objectstore import ObjectStore
from orchestrator.errors import InvalidTransition
from orchestrator.jobs import archive_published_adapter, fine_tuned_model_name
from orchestrator.settings import Settings
from orchestrator.states import JobStatus
from orchestrator.store import JobStore
from orchestrator.tables import JobRow

LogContext = Callable[[JobRow], dict[str, Any]]  # `extra=` of a log line about a job


class JobOutcomes:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        objects: ObjectStore,
        log: logging.Logger,  # the scheduling mode's own logger
        context: LogContext,
    ) -> None:
        self.log = log
        self.settings = settings
        self.store = store
        self.objects = objects
        self.context = context

    def succeed(self, job: JobRow) -> None:
        problem = archive_published_adapter(self.objects, job)
        if problem:
            self.fail(job, "infrastructure", problem)
            return
        self.log.info("job %s succeeded", job.id, extra=self.context(job))
        self.guarded(
            self.store.succeed,
            job.id,
            job.attempt,
            fine_tuned_model_name(job),
            "The job has successfully completed",
        )

    def retry_or_fail(self, job: JobRow, reason: str) -> None:
        """The job's run or host was lost: requeued (to resume from its last checkpoint)
        while attempts are left, cancelled if it was asked to stop anyway, else failed."""
        if job.status == JobStatus.CANCELLING.value:
            self.guarded(self.store.cancel, job.id, attempt=job.attempt)
        elif job.attempt < self.settings.max_attempts:
            self.log.warning("job %s requeued: %s", job.id, reason, extra=self.context(job))
            self.guarded(self.store.requeue, job.id, job.attempt, reason)
        else:
            self.fail(job, "infrastructure", f"{reason}; gave up after {job.attempt} attempts")

    def fail(self, job: JobRow, code: str, message: str, param: str | None = None) -> None:
        self.log.warning("job %s failed (%s): %s", job.id, code, message, extra=self.context(job))
        self.guarded(self.store.fail, job.id, code, message, param=param, attempt=job.attempt)

    def guarded(self, operation: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            operation(*args, **kwargs)
        except InvalidTransition as exc:
            self.log.info("skipped: %s", exc)
