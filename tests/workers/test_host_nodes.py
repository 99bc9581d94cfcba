"""A pack host on real Ray lives on a control node (here: the head, none being marked) and
its reports name each rank's node beside its pid (orchestrator.scheduling.node_choice)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.host_protocol import AdmissionRequest
from core.objectstore import ObjectStoreConfig
from core.spec import LoraSettings
from orchestrator.scheduling.node_choice import HEAD_MARKER
from orchestrator.scheduling.ray_hosts import RayHosts
from tests.workers.conftest import (
    Watch,
    all_ended,
    for_tenant,
    free_placement_groups,
    host_spec,
    job,
)

pytestmark = pytest.mark.slow


def test_a_host_lives_on_the_head_and_reports_each_ranks_node(
    ray_address: str, tiny_base: Path, store_config: ObjectStoreConfig, tmp_path: Path
) -> None:
    import ray

    hosts = RayHosts()
    spec = host_spec(tiny_base, store_config, tmp_path)
    hosts.start_host(spec)
    watch = Watch(hosts, spec.host_id)
    try:
        short = job("job-nodes", 2, LoraSettings(r=4, alpha=8), n_epochs=1)
        assert hosts.admit(
            spec.host_id, AdmissionRequest(for_tenant(short, "n", tiny_base))
        ).admitted
        report = watch.until(lambda r: len(r["worker_pids"]) == 2 and all_ended(r))
        alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        (head,) = [i for i, n in alive.items() if HEAD_MARKER in n["Resources"]]
        assert report["node"] == {"node_id": head, "ip": alive[head]["NodeManagerAddress"]}
        assert len(report["worker_nodes"]) == len(report["worker_pids"]) == 2
        for rank in report["worker_nodes"]:
            assert rank["ip"] == alive[rank["node_id"]]["NodeManagerAddress"]
    finally:
        hosts.kill(spec.host_id)
        free_placement_groups()
