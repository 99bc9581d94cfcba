"""Training runs on Ray, as the scheduler sees them: launch, poll, stop, release.

Each run is a detached actor named `lorafleet-run-{run_id}`; nothing here is kept in
memory, so a restarted scheduler finds every run again by name.
"""

from __future__ import annotations

import os
from typing import Any

import ray

from orchestrator.settings import Settings
from workers.run_actor import NAMESPACE, RunActor, run_actor_name
from workers.spec import RunSpec

POLL_TIMEOUT_S = 30


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
        stale = self._actor(spec.run_id)
        if stale is not None:  # left by an earlier attempt that was given up on
            ray.kill(stale)
        actor = RunActor.options(  # type: ignore[attr-defined]
            name=run_actor_name(spec.run_id), namespace=NAMESPACE, lifetime="detached"
        ).remote(spec)
        ray.get(actor.start.remote(), timeout=POLL_TIMEOUT_S)

    def poll(self, run_id: str, cursor: int) -> dict[str, Any] | None:
        """The run's state and new events, or None if the run no longer exists on Ray."""
        actor = self._actor(run_id)
        if actor is None:
            return None
        try:
            result: dict[str, Any] = ray.get(actor.poll.remote(cursor), timeout=POLL_TIMEOUT_S)
        except ray.exceptions.RayActorError:
            return None
        return result

    def stop(self, run_id: str) -> None:
        actor = self._actor(run_id)
        if actor is not None:
            actor.stop.remote()

    def release(self, run_id: str) -> None:
        actor = self._actor(run_id)
        if actor is not None:
            ray.kill(actor)
