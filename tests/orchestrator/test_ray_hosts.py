"""Pack hosts are found and reaped in the configured Ray namespace only: two deployments on
one Ray cluster never adopt (or end) each other's hosts. A real named actor on the session's
cluster stands in for a host that has ended. (A host that stops answering costs only its
own jobs: tests/orchestrator/test_host_stall.py, and on real Ray
tests/e2e/test_stopped_host_actor.py.)"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import ray

from core.host_protocol import host_actor_name
from orchestrator.scheduling.ray_hosts import RayHosts
from orchestrator.settings import Settings


def test_hosts_are_found_and_reaped_in_the_configured_namespace(
    ray_address: str, tmp_path: Path
) -> None:
    namespace = f"lf-test-{uuid.uuid4().hex[:8]}"
    host_id = f"host-ns-{uuid.uuid4().hex[:8]}"

    @ray.remote(num_cpus=0)
    class EndedHost:
        def poll(self, cursors: dict[str, int]) -> dict[str, Any]:
            return {"host_id": host_id, "alive": False, "jobs": {}}

        def finished(self) -> bool:
            return True

    actor = EndedHost.options(name=host_actor_name(host_id), namespace=namespace).remote()  # type: ignore[attr-defined]
    ray.get(actor.finished.remote())
    try:
        ours = RayHosts(Settings(data_dir=tmp_path, ray_namespace=namespace))
        default = RayHosts(Settings(data_dir=tmp_path))
        assert host_id not in default.list_hosts()  # not in the default namespace
        assert default.poll(host_id, {}) is None
        assert host_id not in default.reap()
        assert host_id in ours.list_hosts()
        report = ours.poll(host_id, {})
        assert report is not None and report["host_id"] == host_id
        assert ours.reap() == [host_id]
        assert host_id not in ours.list_hosts() and ours.poll(host_id, {}) is None
        # Read from Ray's own node list: an alive node and one it never had are not preempted.
        alive = ray.get_runtime_context().get_node_id()
        assert ours.preempted_nodes([alive, "f" * 56]) == {}
    finally:
        ray.kill(actor)
