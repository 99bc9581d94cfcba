"""Drain of a Ray node under a pack host (`lorafleet hosts drain NODE`), on a multi-node Ray
cluster on one machine (`ray.cluster_utils.Cluster`, as tests/multinode/test_node_loss.py):
two jobs train on one 2-worker host whose ranks sit on two worker nodes; one of those nodes
is drained. Both jobs are handed back at a step boundary, spend no attempt, and continue on
a new host from exactly the step they were drained at; no rank of the new host is on the
drained node (Ray and lorafleet place nothing there). (A drained job's adapter equals its
uninterrupted twin's: tests/e2e/test_pause_and_drain.py; here too when measured, 0.0, but
that costs this stage ~15 s more.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for_condition
from tests.e2e.conftest import LorafleetServer
from tests.e2e.test_training_job import DATA, submit, upload
from tests.multinode.conftest import cluster_env, metrics_steps
from tests.multinode.test_node_loss import NAMESPACE, cluster

pytestmark = [pytest.mark.slow, pytest.mark.multinode]
__all__ = ["cluster"]  # the module's cluster fixture


def test_a_drained_node_hands_its_jobs_back_and_they_go_on_elsewhere_exactly(
    cluster: Any, tiny_base: Path, tmp_path: Path
) -> None:
    from orchestrator.scheduling.drain import drain
    from orchestrator.scheduling.ray_hosts import RayHosts
    from orchestrator.settings import Settings

    server = LorafleetServer(
        env=cluster_env(
            cluster.address,
            tmp_path,
            tiny_base,
            NAMESPACE,
            host_idle_seconds="120",  # the new host stays up to be looked at
            max_concurrent_runs="2",
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
                "hyperparameters": {"n_epochs": 16, "batch_size": 4},
            }
            jobs = [submit(client, **common, seed=seed)["id"] for seed in (1, 2)]
            wait_for_condition(
                lambda: all(len(metrics_steps(server, client, j)) >= 2 for j in jobs),
                timeout=300,
                interval=0.3,
                what="both jobs training",
            )
            settings = Settings(ray_namespace=NAMESPACE, data_dir=tmp_path / "state")
            hosts = RayHosts(settings)
            (host_id,) = hosts.list_hosts()
            report = hosts.poll(host_id, {})
            assert report is not None and set(report["jobs"]) == set(jobs)
            rank_nodes = sorted({rank["node_id"] for rank in report["worker_nodes"]})
            assert len(rank_nodes) == 2, report["worker_nodes"]
            drained = rank_nodes[0]

            assert drain(drained[:12], settings) == [host_id]  # an id prefix names the node
            # Ray's autoscaler state (what placement reads) says so within a report or two.
            # Once the host has handed its ranks back, the drained node is idle and its raylet
            # exits: on a slow machine the node may already be gone (dead) when first looked at.
            wait_for_condition(
                lambda: (
                    {n.node_id: n.status for n in hosts.nodes()}.get(drained, "DEAD")
                    in ("DRAINING", "DEAD")
                ),
                timeout=30,
                what="the node DRAINING (or, once idle, gone) in Ray's cluster state",
            )

            for job_id in jobs:
                job = server.wait_until_terminal(client, job_id, timeout=400)
                assert job["status"] == "succeeded", job
                events = server.all_events(client, job_id)
                said = [
                    e["message"]
                    for e in events
                    if re.match(
                        r"Drained from node \S+ \(\w{8}\) at step \d+; its slot", e["message"]
                    )
                ]
                assert len(said) == 1 and drained[:8] in said[0], said
                step = int(re.search(r"at step (\d+);", said[0]).group(1))  # type: ignore[union-attr]
                steps = metrics_steps(server, client, job_id)
                assert steps == list(range(1, steps[-1] + 1)) and 0 < step < steps[-1], steps
                placed = [e["data"] for e in events if "run_id" in (e["data"] or {})]
                assert [p["attempt"] for p in placed] == [1, 1], placed  # no attempt spent
                new_host = placed[-1]["run_id"]
                assert new_host != host_id
                resumed = [e["data"] for e in events if "resumed_from_step" in (e["data"] or {})]
                assert resumed[-1]["resumed_from_step"] == step
            # No rank of the new host is on the drained node.
            moved = hosts.poll(new_host, {})
            assert moved is not None and moved["worker_nodes"]
            assert drained not in {r["node_id"] for r in moved["worker_nodes"]}
            hosts.stop(new_host)
    finally:
        server.stop()
