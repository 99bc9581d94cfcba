"""The home of one training run on Ray: a detached, named actor that owns `TorchTrainer.fit()`.

Detached so that the control plane can die and come back: the run goes on, and a new
scheduler finds it again by name. The actor keeps the run's events (a growing list the
scheduler reads with a cursor), its state, and the cooperative stop flag.
"""

from __future__ import annotations

import threading
import traceback
from typing import Any

import ray

from workers.spec import RunSpec

NAMESPACE = "lorafleet"
RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"


def run_actor_name(run_id: str) -> str:
    return f"lorafleet-run-{run_id}"


def _root_cause(exc: BaseException) -> BaseException:
    """Ray wraps a worker's exception (TrainingFailedError → RayTaskError → …): find the user's."""
    seen = exc
    for _ in range(10):
        inner = getattr(seen, "cause", None) or seen.__cause__
        worker_failures = getattr(seen, "worker_failures", None)
        if worker_failures:
            inner = next(iter(worker_failures.values()))
        if inner is None or inner is seen:
            break
        seen = inner
    return seen


@ray.remote(num_cpus=0, max_concurrency=8)  # type: ignore[call-overload]
class RunActor:
    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.events: list[dict[str, Any]] = []
        self.state = RUNNING
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._fit, name="fit", daemon=True)
            self._thread.start()

    def _fit(self) -> None:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from workers.recipe import train_loop_per_worker

        spec = self.spec
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"spec": spec, "reporter": ray.get_runtime_context().current_actor},
            scaling_config=ScalingConfig(
                num_workers=spec.num_workers,
                use_gpu=spec.use_gpu,
                resources_per_worker={"CPU": 1, **({"GPU": 1} if spec.use_gpu else {})},
            ),
            torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
            run_config=RunConfig(
                name=f"{spec.run_id}",
                storage_path=str(spec.storage_path),
                failure_config=FailureConfig(max_failures=0),
            ),
        )
        try:
            trainer.fit()
            self.state = CANCELLED if self._stop.is_set() else SUCCEEDED
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the job
            cause = _root_cause(exc)
            self.error = f"{type(cause).__name__}: {cause}".strip()
            self.events.append(
                {
                    "type": "message",
                    "level": "error",
                    "message": f"Training failed: {self.error}"[:2000],
                    "data": {"traceback": traceback.format_exception(exc)[-5:]},
                }
            )
            self.state = FAILED

    # ---- called by rank 0 ----
    def record(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def should_stop(self) -> bool:
        return self._stop.is_set()

    # ---- called by the scheduler ----
    def stop(self) -> None:
        self._stop.set()

    def poll(self, cursor: int) -> dict[str, Any]:
        """The state, then the events from `cursor` on.

        Read in this order because every event is appended before the state changes: a
        poll that sees a final state has also seen every event of the run.
        """
        state = self.state
        events = self.events[cursor:]
        return {
            "events": events,
            "cursor": cursor + len(events),
            "state": state,
            "error": self.error,
        }
