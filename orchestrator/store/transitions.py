"""Every change of a job's row, as named operations: each starts from the statuses the
transition table allows for it, writes only its own columns, and appends its event in the
same transaction (one guarded `UPDATE … WHERE id AND status IN (…) [AND attempt = …]` that
must touch exactly one row)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.job_settings import JobSettings
from orchestrator.errors import InvalidTransition
from orchestrator.states import JobStatus, is_allowed, sources_of
from orchestrator.store.changes import wake_scheduler
from orchestrator.store.rows import add_events, now
from orchestrator.store.rows import event_row as _event
from orchestrator.tables import JobRow
from orchestrator.usage import add_usage, usage_of_events


class JobTransitions:
    """The job-row half of JobStore (which supplies `sessions`)."""

    sessions: sessionmaker[Session]

    def queue(self, job_id: str, message: str) -> JobRow:
        """validating_files → queued: the job's files were found."""
        return self._move(job_id, (JobStatus.VALIDATING_FILES,), JobStatus.QUEUED, message)

    def claim(
        self,
        job_id: str,
        attempt: int,
        run_id: str,
        message: str,
        settings: JobSettings | None = None,
    ) -> JobRow:
        """queued → running as the next attempt, in run `run_id`; `attempt` is the attempt
        the caller saw, so of two schedulers claiming the same job exactly one wins.
        `settings`: the job's settings with what its launch resolved (core/job_settings.py)."""
        launched = {} if settings is None else {"settings": settings}
        return self._move(
            job_id,
            (JobStatus.QUEUED,),
            JobStatus.RUNNING,
            message,
            expected_attempt=attempt,
            data={"run_id": run_id, "attempt": attempt + 1},
            values={
                "attempt": JobRow.attempt + 1,
                "run_id": run_id,
                "started_at": now(),
                # Set by the first claim only: max_runtime counts the job's whole life.
                "first_started_at": func.coalesce(JobRow.first_started_at, now()),
                "event_cursor": 0,
                "estimated_finish": None,  # an earlier attempt's, until this one's steps come
                **launched,
            },
        )

    def succeed(
        self,
        job_id: str,
        attempt: int,
        fine_tuned_model: str,
        message: str,
        result_files: list[str] | None = None,
    ) -> JobRow:
        """running|cancelling → succeeded, once attempt `attempt` published its adapter."""
        return self._move(
            job_id,
            (JobStatus.RUNNING, JobStatus.CANCELLING),
            JobStatus.SUCCEEDED,
            message,
            expected_attempt=attempt,
            data={"attempt": attempt},
            values={
                "finished_at": now(),
                "fine_tuned_model": fine_tuned_model,
                "result_files": result_files,
            },
        )

    def fail(
        self,
        job_id: str,
        code: str,
        reason: str,
        *,
        param: str | None = None,
        attempt: int | None = None,
        result_files: list[str] | None = None,
    ) -> JobRow:
        """Any unfinished status → failed, with the error's code, message and param."""
        return self._move(
            job_id,
            sources_of(JobStatus.FAILED),
            JobStatus.FAILED,
            f"Job failed: {reason}",
            level="error",
            expected_attempt=attempt,
            values={
                "finished_at": now(),
                "error_code": code,
                "error_message": reason,
                "error_param": param,
                "result_files": result_files,
            },
        )

    def cancel(
        self, job_id: str, *, attempt: int | None = None, result_files: list[str] | None = None
    ) -> JobRow:
        """A job not yet running, or one whose run stopped (cancelling, paused) → cancelled."""
        return self._move(
            job_id,
            (JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.CANCELLING, JobStatus.PAUSED),
            JobStatus.CANCELLED,
            "Job cancelled",
            expected_attempt=attempt,
            values={"finished_at": now(), "result_files": result_files},
        )

    def request_cancel(self, job_id: str) -> JobRow:
        """running|pausing → cancelling: the run is asked to stop; the scheduler finishes
        the move."""
        return self._move(
            job_id,
            (JobStatus.RUNNING, JobStatus.PAUSING),
            JobStatus.CANCELLING,
            "Cancellation requested",
            wake=True,
        )

    def request_pause(self, job_id: str, by: dict[str, Any]) -> JobRow:
        """running → pausing: the job's host checkpoints it at its next step boundary and
        frees its slot; the scheduler finishes the move (`pause`). `by`: who asked."""
        return self._move(
            job_id,
            (JobStatus.RUNNING,),
            JobStatus.PAUSING,
            f"Pause requested by {_who(by)}",
            data={"requested_by": by},
            wake=True,
        )

    def pause(self, job_id: str, attempt: int, message: str, *, spent: bool = False) -> JobRow:
        """pausing → paused: attempt `attempt` handed its slot back with a checkpoint; the
        attempt is given back (`spent`: kept, when the run was lost instead)."""
        return self._move(
            job_id,
            (JobStatus.PAUSING,),
            JobStatus.PAUSED,
            message,
            expected_attempt=attempt,
            values={} if spent else {"attempt": JobRow.attempt - 1},
        )

    def resume(self, job_id: str, by: dict[str, Any]) -> JobRow:
        """paused → queued: the job runs again from the checkpoint it paused at."""
        return self._move(
            job_id,
            (JobStatus.PAUSED,),
            JobStatus.QUEUED,
            f"Resumed by {_who(by)}; queued to continue from its checkpoint",
            data={"requested_by": by},
            wake=True,
        )

    def hand_back(self, job_id: str, attempt: int, message: str) -> JobRow:
        """running → queued: attempt `attempt` was checkpointed at a step boundary and handed
        back by its host (a drain): the job continues from there, the attempt not spent."""
        return self._move(
            job_id,
            (JobStatus.RUNNING,),
            JobStatus.QUEUED,
            message,
            expected_attempt=attempt,
            values={"attempt": JobRow.attempt - 1},
        )

    def requeue(self, job_id: str, attempt: int, reason: str) -> JobRow:
        """running → queued: attempt `attempt` was lost to the infrastructure; the job runs
        again (from its last checkpoint) as a new attempt."""
        return self._move(
            job_id,
            (JobStatus.RUNNING,),
            JobStatus.QUEUED,
            f"Run lost ({reason}); job requeued",
            level="warn",
            expected_attempt=attempt,
        )

    def requeue_preempted(
        self, job_id: str, attempt: int, message: str, data: dict[str, Any]
    ) -> JobRow:
        """running → queued: attempt `attempt` was lost with its host's preempted node; the
        job runs again from its last checkpoint, the attempt given back and one of its
        preemptions counted instead (the caller checked the budget)."""
        return self._move(
            job_id,
            (JobStatus.RUNNING,),
            JobStatus.QUEUED,
            message,
            level="warn",
            data=data,
            expected_attempt=attempt,
            values={"attempt": JobRow.attempt - 1, "preemptions": JobRow.preemptions + 1},
        )

    def unclaim(self, job_id: str, attempt: int, message: str) -> JobRow:
        """running → queued, undoing the `claim` of attempt `attempt` whose host refused the
        job, so it never trained: the attempt is given back, not spent."""
        return self._move(
            job_id,
            (JobStatus.RUNNING,),
            JobStatus.QUEUED,
            message,
            expected_attempt=attempt,
            # A first attempt that never trained did not start the job's life either.
            values={
                "attempt": JobRow.attempt - 1,
                "first_started_at": None if attempt == 1 else JobRow.first_started_at,
            },
        )

    def warn(self, job_id: str, attempt: int, message: str, data: dict[str, Any]) -> bool:
        """Appends a warning to a job still in attempt `attempt` (no state change); False if
        the job moved on."""
        with self.sessions.begin() as session:
            current = session.scalar(
                select(JobRow.id)
                .where(JobRow.id == job_id, JobRow.attempt == attempt)
                .with_for_update()
            )
            if current is None:
                return False
            add_events(session, job_id, [_event(job_id, message, level="warn", data=data)])
        return True

    def _move(
        self,
        job_id: str,
        sources: tuple[JobStatus, ...],
        target: JobStatus,
        message: str,
        *,
        level: str = "info",
        data: dict[str, Any] | None = None,
        expected_attempt: int | None = None,
        values: dict[str, Any] | None = None,
        wake: bool = False,
    ) -> JobRow:
        """The one guarded UPDATE: moves the job to `target` if it is in one of `sources`
        (and, when given, still in `expected_attempt`, which fences stale runs out), and
        appends the event in the same transaction. Raises InvalidTransition, changing
        nothing, when no row matched. `wake`: the API's request, which the scheduler acts on
        (store/changes.py: it is woken on commit rather than at its next poll)."""
        assert all(is_allowed(s, target) for s in sources), (sources, target)
        guard = [JobRow.id == job_id, JobRow.status.in_([s.value for s in sources])]
        if expected_attempt is not None:
            guard.append(JobRow.attempt == expected_attempt)
        with self.sessions.begin() as session:
            result = session.execute(
                update(JobRow).where(*guard).values(status=target.value, **(values or {}))
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                current = session.scalar(select(JobRow.status).where(JobRow.id == job_id))
                raise InvalidTransition(job_id, target.value, current)
            event = _event(
                job_id, message, level=level, data={**(data or {}), "status": target.value}
            )
            add_events(session, job_id, [event])
            if wake:
                wake_scheduler(session, job_id)
            row = session.get(JobRow, job_id, populate_existing=True)
            assert row is not None
            return row

    def record_run_events(
        self,
        job_id: str,
        attempt: int,
        events: Sequence[dict[str, Any]],
        cursor: int,
        trained_tokens: int | None = None,
        estimated_finish: int | None = None,
        preemptions: int | None = None,
    ) -> bool:
        """Stores a run's new events and moves the job's cursor from where they started,
        fenced by attempt and by that cursor; `trained_tokens` is the newest count,
        `estimated_finish` the newest estimate and `preemptions` the host's newest count of
        the job's preemptions (it counted on from the job's own), if any.

        Returns False (storing nothing) if the job has moved on to another attempt, or if
        another scheduler already stored these events.
        """
        values: dict[str, Any] = {"event_cursor": cursor}
        if trained_tokens is not None:
            values["trained_tokens"] = trained_tokens
        if estimated_finish is not None:
            values["estimated_finish"] = estimated_finish
        if preemptions is not None:
            values["preemptions"] = preemptions
        with self.sessions.begin() as session:
            result = session.execute(
                update(JobRow)
                .where(
                    JobRow.id == job_id,
                    JobRow.attempt == attempt,
                    JobRow.event_cursor == cursor - len(events),
                )
                .values(**values)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return False
            rows = [
                _event(
                    job_id,
                    event.get("message", ""),
                    level=event.get("level", "info"),
                    type_="metrics" if event.get("type") == "metrics" else "message",
                    data=event.get("data"),
                )
                for event in events
            ]
            add_events(session, job_id, rows)
            usage = usage_of_events(events)
            if usage:  # in this transaction: fenced like the events, so counted once
                tenant = session.scalar(select(JobRow.tenant).where(JobRow.id == job_id))
                assert tenant is not None
                add_usage(session, tenant, usage)
        return True


def _who(by: dict[str, Any]) -> str:
    """Who asked, for an event's words ("tenant acme, key key-…")."""
    return ", ".join(f"{k} {v}" for k, v in by.items() if v)
