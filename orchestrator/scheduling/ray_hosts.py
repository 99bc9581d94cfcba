"""Pack hosts on Ray, as the scheduler sees them (`core.host_protocol.PackHosts`).

Each host is a detached, named actor `lorafleet-host-{host_id}` (`workers.host.pack_host`):
nothing is kept here, so a restarted scheduler adopts every host by listing the names.
"""

from __future__ import annotations

from typing import Any

import ray

from core.host_protocol import (
    HOST_PREFIX,
    AdmissionRequest,
    AdmissionResult,
    HostReport,
    HostSpec,
    host_actor_name,
)
from core.run_states import STOP_ALL
from orchestrator.settings import Settings
from workers.runtime.placement_groups import release_orphaned_placement_groups

CALL_TIMEOUT_S = 30
START_TIMEOUT_S = 60


class RayHosts:
    """Needs a connected Ray (`orchestrator.scheduling.ray_runs.RayRuns.connect`)."""

    def __init__(self, settings: Settings | None = None) -> None:
        # The configured namespace, as for runs (orchestrator/scheduling/ray_runs.py): two
        # deployments on one Ray cluster never adopt each other's hosts.
        self.namespace = (settings or Settings()).ray_namespace

    def _actor(self, host_id: str) -> Any | None:
        try:
            return ray.get_actor(host_actor_name(host_id), namespace=self.namespace)
        except ValueError:
            return None

    def list_hosts(self) -> list[str]:
        names = ray.util.list_named_actors(all_namespaces=True)
        return sorted(
            entry["name"].removeprefix(HOST_PREFIX)
            for entry in names
            if entry["namespace"] == self.namespace and entry["name"].startswith(HOST_PREFIX)
        )

    def start_host(self, spec: HostSpec) -> None:
        from workers.host.pack_host import PackHost

        actor = PackHost.options(  # type: ignore[attr-defined]
            name=host_actor_name(spec.host_id), namespace=self.namespace, lifetime="detached"
        ).remote(spec)
        ray.get(actor.start.remote(), timeout=START_TIMEOUT_S)

    def admit(self, host_id: str, request: AdmissionRequest) -> AdmissionResult:
        actor = self._actor(host_id)
        if actor is None:
            return AdmissionResult(False, "no such host")
        try:
            result: AdmissionResult = ray.get(actor.admit.remote(request), timeout=CALL_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return AdmissionResult(False, "host unreachable")
        return result

    def release(self, host_id: str, job_id: str) -> None:
        actor = self._actor(host_id)
        if actor is not None:
            actor.release.remote(job_id)

    def poll(self, host_id: str, cursors: dict[str, int]) -> HostReport | None:
        actor = self._actor(host_id)
        if actor is None:
            return None
        try:
            report: HostReport = ray.get(actor.poll.remote(cursors), timeout=CALL_TIMEOUT_S)
        except ray.exceptions.RayActorError:
            return None
        return report

    def stop(self, host_id: str, job_id: str = STOP_ALL) -> None:
        actor = self._actor(host_id)
        if actor is not None:
            actor.stop.remote(job_id)

    def kill(self, host_id: str) -> None:
        actor = self._actor(host_id)
        if actor is not None:
            ray.kill(actor)

    def reap(self) -> list[str]:
        """Removes host actors whose workers have ended (idle, stopped or failed), then the
        placement groups of hosts and runs that are gone (`workers.runtime.placement_groups`)."""
        reaped = []
        for host_id in self.list_hosts():
            actor = self._actor(host_id)
            if actor is None:
                continue
            try:
                finished = ray.get(actor.finished.remote(), timeout=CALL_TIMEOUT_S)
            except ray.exceptions.RayActorError:
                finished = True
            except ray.exceptions.GetTimeoutError:
                continue
            if finished:
                ray.kill(actor)
                reaped.append(host_id)
        release_orphaned_placement_groups(self.namespace)
        return reaped

    def free_resources(self) -> list[dict[str, float]]:
        # Per node: Ray's public API has only the cluster-wide sum (or, with the dashboard,
        # the state API); a host's bundles must each fit on one node.
        from ray._private.state import state

        return [
            {key: float(amount) for key, amount in free.items() if key in ("CPU", "GPU")}
            for free in state.available_resources_per_node().values()
        ]
