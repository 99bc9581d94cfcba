"""Several Ray nodes on one machine (`ray.cluster_utils.Cluster`: separate raylets and object
stores, as Ray's own multi-node tests use): a head with no CPUs carrying the
`lorafleet-control` resource and three worker nodes of one CPU each. Two jobs train on one
2-worker pack host whose ranks sit on two worker nodes (one CPU each forces the spread); the
host actor is on the head. One of those worker nodes is removed mid-training (its raylet and
workers killed): both jobs still succeed, once each, on their first attempt (the host, on the
head, restarts its workers on the nodes left).

Its own stage of `make test` (`pytest -m multinode`, a pytest process of its own): the rest
of the suite shares one local Ray (tests/conftest.py `ray_address`), which this cluster
must not meet in the same process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.scheduling.node_choice import HEAD_MARKER
from tests.conftest import wait_for_condition
from tests.e2e.conftest import LorafleetServer
from tests.e2e.test_training_job import DATA, submit, upload
from tests.multinode.conftest import cluster_env, metrics_steps

pytestmark = [pytest.mark.slow, pytest.mark.multinode]
CONTROL = "lorafleet-control"
NAMESPACE = "lorafleet-multinode"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.fail("run the multinode tests in a pytest process of their own (make test does)")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # as the embedded Ray (embedded_ray.py)
    nodes = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "resources": {CONTROL: 1},
            # A node's death is declared within ~3 s (Ray's default: ~15 s): before the new
            # workers start, so the restart's event can name the lost node (it names only
            # nodes Ray already says are dead).
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        },
    )
    workers = [nodes.add_node(num_cpus=1) for _ in range(3)]
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, namespace=NAMESPACE, log_to_driver=False)
    nodes.lorafleet_workers = workers  # type: ignore[attr-defined]
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def test_a_worker_node_lost_mid_training_costs_no_job_an_attempt(
    cluster: Any, tiny_base: Path, tmp_path: Path
) -> None:
    import ray

    from orchestrator.scheduling.ray_hosts import RayHosts
    from orchestrator.settings import Settings

    server = LorafleetServer(
        env=cluster_env(
            cluster.address,
            tmp_path,
            tiny_base,
            NAMESPACE,
            checkpoint_every_steps="3",
            host_idle_seconds="5",
            max_concurrent_runs="1",
        ),
        log=tmp_path / "server.log",
    )
    server.start()
    try:
        with server.client() as client:
            file_id = upload(client, DATA)
            common: dict[str, Any] = {
                "model": "tiny-llama",
                "training_file": file_id,
                "resources": {"num_workers": 2},
                "training": {"precision": "fp32"},
                "hyperparameters": {"n_epochs": 8, "batch_size": 4},
            }
            jobs = [submit(client, **common, seed=seed)["id"] for seed in (1, 2)]
            wait_for_condition(
                lambda: all(len(metrics_steps(server, client, j)) >= 3 for j in jobs),
                timeout=300,
                interval=0.5,
                what="both jobs training",
            )
            hosts = RayHosts(Settings(ray_namespace=NAMESPACE))
            (host_id,) = hosts.list_hosts()
            report = hosts.poll(host_id, {})
            assert report is not None and set(report["jobs"]) == set(jobs)
            alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
            (head,) = [i for i, n in alive.items() if HEAD_MARKER in n["Resources"]]
            assert report["node"]["node_id"] == head  # the control node, not a worker node
            rank_nodes = {rank["node_id"] for rank in report["worker_nodes"]}
            assert len(rank_nodes) == 2 and head not in rank_nodes, report["worker_nodes"]

            (victim,) = [n for n in cluster.lorafleet_workers if n.node_id in rank_nodes][:1]
            lost_at = max(max(metrics_steps(server, client, j)) for j in jobs)
            cluster.remove_node(victim, allow_graceful=False)

            for job_id in jobs:
                job = server.wait_until_terminal(client, job_id, timeout=400)
                assert job["status"] == "succeeded", job
                steps = metrics_steps(server, client, job_id)
                assert max(steps) > lost_at  # it trained on after the loss
                # The restart names the lost node in the job's events.
                said = [e for e in server.all_events(client, job_id) if "was lost" in e["message"]]
                assert said and victim.node_id[:8] in said[0]["message"], said
                # Placed once, on the one host, first attempt: not requeued by the loss.
                placed = [
                    e["data"]
                    for e in server.all_events(client, job_id)
                    if "run_id" in (e["data"] or {})
                ]
                assert {(p["run_id"], p.get("attempt", 1)) for p in placed} == {(host_id, 1)}
                assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "succeeded"
            after = hosts.poll(host_id, {})
            if after is not None:  # not idled out yet: its ranks left the lost node
                assert victim.node_id not in {r["node_id"] for r in after["worker_nodes"]}
    finally:
        server.stop()
