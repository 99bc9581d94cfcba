"""A control node lost (`ray.cluster_utils.Cluster`, several raylets on one machine): a head with
no CPUs and no control resource, two control nodes (`lorafleet-control`, no CPUs) and three
worker nodes of one CPU, two of them in the node group `group-a` (`lorafleet-group:group-a`),
which `LORAFLEET_BASE_NODE_GROUPS` gives the base. Two jobs train on one 2-worker pack host;
its actor and Ray Train controller sit on one control node, its ranks on the group's two
nodes (never the third worker node). That control node's raylet is SIGKILLed mid-training:
its host goes with it, both jobs are requeued, resume from their checkpoints on a new host on
the other control node (its ranks again in the group), and succeed, once each. Meanwhile the
worker node outside the group is drained for preemption with a deadline, as a spot notice
would: the host's rule (`workers.host.node_loss`) reads it from Ray as preempted.

Its own stage of `make test` (`pytest -m multinode`, a pytest process of its own), as
tests/multinode/test_node_loss.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.host_protocol import NodeRef
from tests.conftest import wait_for_condition
from tests.e2e.conftest import LorafleetServer
from tests.e2e.test_training_job import DATA, submit, upload
from tests.multinode.conftest import cluster_env, metrics_steps

pytestmark = [pytest.mark.slow, pytest.mark.multinode]
CONTROL = "lorafleet-control"
GROUP = "lorafleet-group:group-a"
NAMESPACE = "lorafleet-control-loss"


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
            # A node's death is declared within ~3 s (Ray's default: ~15 s).
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        },
    )
    nodes.lorafleet_control = [  # type: ignore[attr-defined]
        nodes.add_node(num_cpus=0, resources={CONTROL: 1}) for _ in range(2)
    ]
    nodes.lorafleet_group = [  # type: ignore[attr-defined]
        nodes.add_node(num_cpus=1, resources={GROUP: 1}) for _ in range(2)
    ]
    nodes.lorafleet_other = nodes.add_node(num_cpus=1)  # type: ignore[attr-defined]
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, namespace=NAMESPACE, log_to_driver=False)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def spot_notice(node: Any) -> None:
    """Ray's drain of `node` for preemption with a deadline (what `ray drain-node --reason
    DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds 60` sends); an idle node ends at
    once. Ray then says it died preempted, which a host's restart counts as a preemption."""
    import ray
    from ray.core.generated import autoscaler_pb2

    from workers.host.node_loss import lost_nodes, preemption

    gcs = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    deadline_ms = int((time.time() + 60) * 1000)
    assert gcs.drain_node(node.node_id, reason, "spot notice", deadline_ms)[0]
    rank = NodeRef(node_id=node.node_id, ip=node.node_ip_address)
    wait_for_condition(
        lambda: bool(lost_nodes([rank], ray.nodes())), timeout=60, what="the drained node gone"
    )
    lost = lost_nodes([rank], ray.nodes())
    assert preemption(lost) and lost[0].said == "spot notice", lost


def test_a_lost_control_nodes_jobs_resume_on_a_host_on_the_other(
    cluster: Any, tiny_base: Path, tmp_path: Path
) -> None:
    from orchestrator.scheduling.ray_hosts import RayHosts
    from orchestrator.settings import Settings

    server = LorafleetServer(
        env=cluster_env(
            cluster.address,
            tmp_path,
            tiny_base,
            NAMESPACE,
            checkpoint_every_steps="3",
            host_idle_seconds="30",
            max_concurrent_runs="1",
            run_start_grace_seconds="5",
            base_node_groups=json.dumps({"tiny-llama": "group-a"}),
        ),
        log=tmp_path / "server.log",
    )
    group = {node.node_id for node in cluster.lorafleet_group}
    hosts = RayHosts(Settings(ray_namespace=NAMESPACE))
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
            spot_notice(cluster.lorafleet_other)
            # Past a checkpoint (every 3 steps) with steps to go: the loss comes mid-training.
            wait_for_condition(
                lambda: all(len(metrics_steps(server, client, j)) >= 4 for j in jobs),
                timeout=300,
                interval=0.5,
                what="both jobs past a checkpoint",
            )
            (first,) = hosts.list_hosts()
            report = hosts.poll(first, {})
            assert report is not None and set(report["jobs"]) == set(jobs)
            # The ranks in the base's group; the host on a control node.
            assert {r["node_id"] for r in report["worker_nodes"]} == group, report
            (lost,) = [
                n for n in cluster.lorafleet_control if n.node_id == report["node"]["node_id"]
            ]
            (kept,) = [n for n in cluster.lorafleet_control if n is not lost]
            lost_at = {j: max(metrics_steps(server, client, j)) for j in jobs}

            raylet = lost.all_processes["raylet"][0].process  # a process this test started
            os.kill(raylet.pid, signal.SIGKILL)
            raylet.wait(timeout=30)  # reaped, as its parent would on a real node

            def moved() -> str | None:
                others = [h for h in hosts.list_hosts() if h != first]
                for host_id in others:
                    seen = hosts.poll(host_id, {})
                    # Both jobs there, its workers up (their nodes known).
                    if seen is not None and set(seen["jobs"]) == set(jobs) and seen["worker_nodes"]:
                        return host_id
                return None

            wait_for_condition(
                lambda: moved() is not None,
                timeout=300,
                interval=0.5,
                what="both jobs on a new host",
            )
            second = moved()
            assert second is not None
            after = hosts.poll(second, {})
            assert after is not None and after["node"]["node_id"] == kept.node_id
            assert {r["node_id"] for r in after["worker_nodes"]} == group, after

            for job_id in jobs:
                job = server.wait_until_terminal(client, job_id, timeout=400)
                assert job["status"] == "succeeded", job
                events = server.all_events(client, job_id)
                # Requeued once, saying where the host was; then the new host, attempt 2.
                requeued = [e for e in events if "disappeared" in e["message"]]
                assert len(requeued) == 1, [e["message"] for e in events]
                assert f"its pack host {first} on node" in requeued[0]["message"]
                assert lost.node_id[:8] in requeued[0]["message"]
                placed = {
                    (e["data"]["run_id"], e["data"].get("attempt", 1))
                    for e in events
                    if "run_id" in (e["data"] or {})
                }
                assert placed == {(first, 1), (second, 2)}, placed
                # It resumed from a checkpoint the first host wrote (every 3 steps), not from
                # the start. That may be past the last step whose metrics were stored: a host
                # whose raylet is gone trains on until it notices, and its checkpoints reach
                # the (shared) store while its reports no longer reach the scheduler.
                cut = events.index(requeued[0])
                made = max(e["data"]["step"] for e in events[:cut] if e["type"] == "metrics")
                (resumed,) = [
                    e["data"]["resumed_from_step"]
                    for e in events
                    if (e["data"] or {}).get("resumed_from_step") is not None
                ]
                assert resumed >= 3 and resumed % 3 == 0 and made >= lost_at[job_id], (
                    resumed,
                    made,
                )
                later = [e["data"]["step"] for e in events[cut:] if e["type"] == "metrics"]
                assert later and min(later) == resumed + 1, (resumed, later)
                # Succeeded once, having trained on after the loss.
                done = [e for e in events if e["message"] == "The job has successfully completed"]
                assert len(done) == 1, [e["message"] for e in events]
                assert (
                    max(e["data"]["step"] for e in events[cut:] if e["type"] == "metrics") > resumed
                )
    finally:
        server.stop()
