"""The home of one training run on Ray: a detached, named actor that owns `TorchTrainer.fit()`.

Detached so that the control plane can die and come back: the run goes on, and a new
scheduler finds it again by name. A run trains a pack of jobs; the actor keeps each job's
events (a growing list read with a cursor), each job's state, and the stop requests.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray

from core.run_states import NAMESPACE, STOP_ALL, RunJobState, run_actor_name
from core.spec import RunSpec
from workers.run_events import EventOrder
from workers.runtime.ray_trainer import FitFailure, trainer_for

# Ray writes an actor's logging to its log files, where operators look.
logger = logging.getLogger("lorafleet.run")

RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    RunJobState.RUNNING,
    RunJobState.SUCCEEDED,
    RunJobState.FAILED,
    RunJobState.CANCELLED,
)
__all__ = ["NAMESPACE", "STOP_ALL", "RunActor", "run_actor_name"]
# Events from the recipe that end one job of the pack.
_JOB_ENDINGS = {"published": SUCCEEDED, "job_failed": FAILED, "job_cancelled": CANCELLED}


@ray.remote(num_cpus=0, max_concurrency=8)  # type: ignore[call-overload]
class RunActor:
    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.events: dict[str, list[dict[str, Any]]] = {job.job_id: [] for job in spec.jobs}
        self.states: dict[str, RunJobState] = dict.fromkeys(self.events, RUNNING)
        self.order = EventOrder()
        self.refused: list[dict[str, Any]] = []  # events for a job that had already ended
        self.worker_processes: list[dict[str, Any]] = []
        self.errors: dict[str, str] = {}
        self.stopping: set[str] = set()
        self.error_codes: dict[str, str] = {}
        self.attempts = 0  # how many times Ray Train started the workers
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._fit, name="fit", daemon=True)
            self._thread.start()

    def _fit(self) -> None:
        from workers.recipe import train_loop_per_worker

        spec = self.spec
        trainer = trainer_for(
            train_loop_per_worker,
            {"spec": spec, "reporter": ray.get_runtime_context().current_actor},
            name=spec.run_id,
            storage_path=spec.storage_path,
            num_workers=spec.num_workers,
            use_gpu=spec.use_gpu,
            # A dead worker restarts the group; the recipe resumes from checkpoints.
            max_failures=spec.max_worker_restarts,
        )
        try:
            trainer.fit()
            self._end_unfinished(CANCELLED if self.stopping else FAILED, "the run ended early")
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the jobs
            failure = FitFailure.of(exc)
            logger.exception("run %s failed: %s", spec.run_id, failure.error)
            self._end_unfinished(FAILED, failure.error, failure.code, traceback=failure.traceback)

    def _end_unfinished(
        self, state: RunJobState, error: str, code: str = "training_error", **data: Any
    ) -> None:
        with self._lock:
            for job_id, current in self.states.items():
                if current != RUNNING:
                    continue
                if state == CANCELLED or job_id in self.stopping:
                    self._append(job_id, {"type": "message", "message": "Training stopped"})
                    self.states[job_id] = CANCELLED
                    continue
                self._append(
                    job_id,
                    {
                        "type": "message",
                        "level": "error",
                        "message": f"Training failed: {error}"[:2000],
                        "data": data or None,
                    },
                )
                self.errors[job_id] = error
                self.error_codes[job_id] = code
                self.states[job_id] = FAILED

    def _append(self, job_id: str, event: dict[str, Any]) -> None:
        self.events[job_id].append(event)

    # ---- called by rank 0 ----
    def record(self, events: list[dict[str, Any]]) -> None:
        """A step's events (rank 0 sends them once per step), each for one job or (job_id
        None) for every job of the pack, numbered by the sender (`workers.run_events`):
        applied in send order whatever order Ray runs the calls in."""
        with self._lock:
            for event in events:
                for ready in self.order.accept(event):
                    self._apply(ready)

    def _apply(self, event: dict[str, Any]) -> None:
        job_id = event.get("job_id")
        if job_id and self.states[job_id].is_terminal():
            # The job ended: the scheduler may have finalised it already. Never reopen it.
            self.refused.append(event)
            logger.warning("event for ended job %s refused: %s", job_id, event.get("type"))
            return
        for target in [job_id] if job_id else list(self.events):
            if self.states[target].is_terminal():
                continue
            self._append(target, event)
        ending = _JOB_ENDINGS.get(event.get("type", ""))
        if job_id and ending:
            self.states[job_id] = ending
            if ending == FAILED:
                self.errors[job_id] = (event.get("data") or {}).get("error", event["message"])

    def begin_attempt(self) -> dict[str, Any]:
        """Called by rank 0 as the workers start: the restart count and the jobs still on."""
        with self._lock:
            self.attempts += 1
            # A dead group's events held behind a gap will never be completed: apply them.
            for ready in self.order.flush_before(self.attempts - 1):
                self._apply(ready)
            running = [job_id for job_id, state in self.states.items() if state == RUNNING]
            return {"restart": self.attempts - 1, "running": running}

    def fail_setup(self, phase: str, error: str) -> None:
        """A rank's setup passed the time limit: every job still running fails, naming the
        phase (a restarted group then finds no job to train and ends at once)."""
        with self._lock:
            for job_id, state in self.states.items():
                if state.is_terminal():
                    continue
                self._append(
                    job_id,
                    {"type": "message", "level": "error", "message": f"Training failed: {error}"},
                )
                self.errors[job_id] = error
                self.error_codes[job_id] = "setup_timeout"
                self.states[job_id] = FAILED
        logger.error("run %s: %s", self.spec.run_id, error)

    def register_workers(self, processes: list[dict[str, Any]]) -> None:
        """Rank 0 reports every rank's process (pid, node) as the group starts."""
        with self._lock:
            self.worker_processes = processes

    def workers(self) -> list[dict[str, Any]]:
        """This run's current worker processes: [{"rank", "pid", "node_id"}] in rank order,
        so that tests and operators act on exactly this run's workers and no one else's."""
        with self._lock:
            return list(self.worker_processes)

    def stop_requests(self) -> list[str]:
        return sorted(self.stopping)

    # ---- called by the scheduler ----
    def stop(self, job_id: str = STOP_ALL) -> None:
        self.stopping.add(job_id)

    def poll(self, job_id: str, cursor: int) -> dict[str, Any]:
        """The job's state, then its events from `cursor` on.

        Read in this order because every event is appended before the state changes: a
        poll that sees a final state has also seen every event of the job.
        """
        with self._lock:
            state = self.states[job_id]
            events = self.events[job_id][cursor:]
            return {
                "events": events,
                "cursor": cursor + len(events),
                "state": state,
                "error": self.errors.get(job_id),
                "error_code": self.error_codes.get(job_id),
            }

    def finished(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()
