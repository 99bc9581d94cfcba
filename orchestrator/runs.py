"""Training runs on Ray, as the scheduler sees them: launch, poll, stop, reap.

Each run is a detached actor named `lorafleet-run-{run_id}`; nothing here is kept in
memory, so a restarted scheduler finds every run again by name.
"""

from __future__ import annotations

import os
from typing import Any

import ray

from core.spec import RunSpec
from orchestrator.settings import Settings
from workers.run_actor import NAMESPACE, STOP_ALL, RunActor, run_actor_name

POLL_TIMEOUT_S = 30
RUN_PREFIX = run_actor_name("")


class RayRuns:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def connect(self) -> None:
        if ray.is_initialized():
            return
        address = self.settings.ray_address or os.environ.get("RAY_ADDRESS")
        options: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False}
        if address:
            ray.init(address=address, **options)
        else:
            # A local cluster: enough logical CPUs for the configured concurrent runs, even
            # on a small machine (workers then share cores rather than wait in line).
            cpus = max(
                os.cpu_count() or 1,
                self.settings.default_num_workers * self.settings.max_concurrent_runs,
            )
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, **options)

    def gpu_available(self) -> bool:
        return float(ray.cluster_resources().get("GPU", 0)) > 0

    def _actor(self, run_id: str) -> Any | None:
        try:
            return ray.get_actor(run_actor_name(run_id), namespace=NAMESPACE)
        except ValueError:
            return None

    def launch(self, spec: RunSpec) -> None:
        actor = RunActor.options(  # type: ignore[attr-defined]
            name=run_actor_name(spec.run_id), namespace=NAMESPACE, lifetime="detached"
        ).remote(spec)
        ray.get(actor.start.remote(), timeout=POLL_TIMEOUT_S)

    def poll(self, run_id: str, job_id: str, cursor: int) -> dict[str, Any] | None:
        """A job's state and new events in its run, or None if the run no longer exists."""
        actor = self._actor(run_id)
        if actor is None:
            return None
        try:
            result: dict[str, Any] = ray.get(
                actor.poll.remote(job_id, cursor), timeout=POLL_TIMEOUT_S
            )
        except ray.exceptions.RayActorError:
            return None
        return result

    def stop(self, run_id: str, job_id: str = STOP_ALL) -> None:
        actor = self._actor(run_id)
        if actor is not None:
            actor.stop.remote(job_id)

    def reap(self, live_run_ids: set[str]) -> list[str]:
        """Removes run actors no live job needs once their fit() has returned."""
        reaped = []
        for name in ray.util.list_named_actors():
            if not name.startswith(RUN_PREFIX):
                continue
            run_id = name.removeprefix(RUN_PREFIX)
            actor = self._actor(run_id)
            if run_id in live_run_ids or actor is None:
                continue
            try:
                finished = ray.get(actor.finished.remote(), timeout=POLL_TIMEOUT_S)
            except ray.exceptions.RayActorError:
                finished = True
            if finished:
                ray.kill(actor)
                reaped.append(run_id)
        return reaped
