"""Ray nodes with addresses of their own, so that addressing bugs cannot hide behind a shared
127.0.0.1: four 1-CPU worker nodes each run in a network namespace of their own (a veth pair
into one bridge), the head on the bridge's address. The module's tests run in order:

1. A 2-worker pack host whose ranks sit on two of those nodes trains a job to the end: its
   ranks can only meet over the bridge (a loopback MASTER_ADDR would reach nobody in the
   other namespace).
2. A node's link goes down under a 2-worker host (two jobs) while a 1-worker host trains on
   another node. Until Ray declares the node dead (seconds: a partition), the other host keeps
   stepping and the scheduler keeps storing its steps; then the first host restarts on the
   nodes left, both its jobs resume from their checkpoints, every job succeeds once, and one
   equals its uninterrupted twin.

Needs root and iproute2 (network namespaces): CI has both, so there it runs, never skips.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.host_protocol import HOST_PREFIX
from tests.conftest import require, wait_for_condition
from tests.e2e.conftest import LorafleetServer
from tests.e2e.test_training_job import DATA, submit, upload
from tests.multinode.conftest import cluster_env
from tests.multinode.test_split_fleet import adapter_tensors, steps_of, worst_difference

pytestmark = [pytest.mark.slow, pytest.mark.multinode]
CONTROL = "lorafleet-control"
NAMESPACE = "lorafleet-distinct-ips"
TAG = f"{os.getpid() % 10000}"
SUBNET = ipaddress.ip_network(f"10.77.{os.getpid() % 250}.0/24")
BRIDGE_IP = str(SUBNET[1])
NODE_IPS = [str(SUBNET[11 + k]) for k in range(4)]  # four: room for a host to restart
# A dead node is declared ~10 s after its link goes down: each health check gives up after
# 1 s (Ray's default 10 s: with packets dropped, not refused, every check waits that long),
# and ten in a row must fail. Long enough to see another host step meanwhile (a partition
# the cluster is slow to declare), short enough for the stage's budget.
HEALTH_CHECKS = {
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 10,
}


def ip(*args: str, netns: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    subprocess.run([*prefix, "ip", *args], check=True, capture_output=True, timeout=30)


def missing() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2 (`ip`)"
    return None


def outside_veth(k: int) -> str:
    """The bridge's end of node k's veth pair: down, the node is cut off."""
    return f"lfv{TAG}o{k}"


@pytest.fixture(scope="module")
def bridge() -> Iterator[list[str]]:
    """A bridge on BRIDGE_IP and one network namespace per worker node on it; their names."""
    require(missing())
    bridge_name, namespaces = f"lfbr{TAG}", [f"lfns{TAG}-{k}" for k in range(len(NODE_IPS))]
    try:
        ip("link", "add", bridge_name, "type", "bridge")
        ip("addr", "add", f"{BRIDGE_IP}/{SUBNET.prefixlen}", "dev", bridge_name)
        ip("link", "set", bridge_name, "up")
        for k, (netns, node_ip) in enumerate(zip(namespaces, NODE_IPS, strict=True)):
            outside, inside = outside_veth(k), f"lfv{TAG}i{k}"
            ip("netns", "add", netns)
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            ip("link", "set", outside, "master", bridge_name, "up")
            ip("link", "set", inside, "netns", netns)
            ip("addr", "add", f"{node_ip}/{SUBNET.prefixlen}", "dev", inside, netns=netns)
            ip("link", "set", inside, "up", netns=netns)
            ip("link", "set", "lo", "up", netns=netns)
        yield namespaces
    finally:
        for netns in namespaces:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", bridge_name], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def cluster(bridge: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The head on the bridge's address (no CPUs, the control resource); one 1-CPU worker
    node in each namespace (`ray start`, as on a machine of its own)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.fail("run the multinode tests in a pytest process of their own (make test does)")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    head = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "resources": {CONTROL: 1},
            "node_ip_address": BRIDGE_IP,
            "_system_config": HEALTH_CHECKS,
        },
    )
    ray_cli = str(Path(sys.executable).with_name("ray"))
    logs = tmp_path_factory.mktemp("nodes")
    temps = [f"/tmp/lfray{TAG}-{k}" for k in range(len(bridge))]  # short: socket paths
    workers = [
        subprocess.Popen(
            ["ip", "netns", "exec", netns, ray_cli, "start", "--block", "--address", head.address]
            + ["--node-ip-address", node_ip, "--num-cpus", "1", "--disable-usage-stats"]
            # A temp folder per node: two `ray start` on one disk would share socket paths.
            + ["--temp-dir", temp],
            env={**os.environ, "RAY_AUTH_MODE": "disabled"},
            stdout=(logs / f"{netns}.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: ended with all it started
        )
        for netns, node_ip, temp in zip(bridge, NODE_IPS, temps, strict=True)
    ]
    try:
        ray.init(address=head.address, namespace=NAMESPACE, log_to_driver=False)
        wait_for_condition(
            lambda: sum(n["Alive"] for n in ray.nodes()) == 1 + len(bridge),
            timeout=120,
            what=f"every node (their logs: {logs})",
        )
        yield head
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] == NAMESPACE and entry["name"].startswith(HOST_PREFIX):
                ray.kill(ray.get_actor(entry["name"], namespace=NAMESPACE))
    finally:
        ray.shutdown()
        for worker in workers:  # `ray start --block` ends its node's processes on SIGTERM
            os.killpg(worker.pid, signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=30)
        head.shutdown()
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)


def test_a_two_node_host_trains_over_the_bridge_not_loopback(
    cluster: Any, tiny_base: Path, tmp_path: Path
) -> None:
    from orchestrator.scheduling.ray_hosts import RayHosts
    from orchestrator.settings import Settings

    server = LorafleetServer(
        # One machine: its folders are every namespace's (only the network differs).
        env=cluster_env(
            cluster.address,
            tmp_path,
            tiny_base,
            NAMESPACE,
            object_store=str(tmp_path / "objects"),
            host_idle_seconds="5",
        ),
        log=tmp_path / "server.log",
    )
    server.start()
    try:
        with server.client() as client:
            job_id = submit(
                client,
                model="tiny-llama",
                training_file=upload(client, DATA),
                resources={"num_workers": 2},
                hyperparameters={"n_epochs": 4, "batch_size": 4},
            )["id"]

            def training() -> bool:
                return any(e["type"] == "metrics" for e in server.all_events(client, job_id))

            wait_for_condition(training, timeout=300, interval=0.5, what="the first step")
            hosts = RayHosts(Settings(ray_namespace=NAMESPACE))
            (host_id,) = hosts.list_hosts()
            report = hosts.poll(host_id, {})
            assert report is not None
            assert report["node"]["ip"] == BRIDGE_IP  # the host on the head (control node)
            rank_ips = [rank["ip"] for rank in report["worker_nodes"]]
            assert len(set(rank_ips)) == 2 and set(rank_ips) <= set(NODE_IPS), rank_ips
            job = server.wait_until_terminal(client, job_id, timeout=300)
            assert job["status"] == "succeeded", job
    finally:
        server.stop()


LINK_STEPS = 4 * len(DATA) // 4  # the 2-worker jobs: 4 epochs of batch 4


def link_job(client: Any, file_id: str, seed: int, workers: int, epochs: int) -> dict[str, Any]:
    return {
        "model": "tiny-llama",
        "training_file": file_id,
        "seed": seed,
        "resources": {"num_workers": workers},
        "training": {"precision": "fp32"},
        "hyperparameters": {"n_epochs": epochs, "batch_size": 4},
    }


def test_a_node_whose_link_goes_down_stalls_no_other_host_and_its_jobs_resume(
    cluster: Any, bridge: list[str], tiny_base: Path, tmp_path: Path
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
            object_store=str(tmp_path / "objects"),
            checkpoint_every_steps="3",
            host_idle_seconds="60",  # the twin trains on the restarted host, warm
        ),
        log=tmp_path / "server.log",
    )
    server.start()
    try:
        with server.client() as client:

            def steps(job_id: str) -> list[int]:
                return steps_of(server.all_events(client, job_id))

            file_id = upload(client, DATA)
            fields = {seed: link_job(client, file_id, seed, 2, 4) for seed in (1, 2)}
            packed = [submit(client, **body)["id"] for body in fields.values()]
            # Long enough to train through the partition and after it.
            other = submit(client, **link_job(client, file_id, 3, 1, 30))["id"]
            wait_for_condition(
                # Past the first checkpoint (every 3 steps), so they resume from one.
                lambda: all(len(steps(j)) >= 4 for j in packed) and bool(steps(other)),
                timeout=300,
                interval=0.5,
                what="all three jobs training",
            )
            hosts = RayHosts(Settings(ray_namespace=NAMESPACE))
            reports = {h: r for h in hosts.list_hosts() if (r := hosts.poll(h, {})) is not None}
            (host_id,) = [h for h, r in reports.items() if set(packed) <= set(r["jobs"])]
            (other_host,) = [h for h, r in reports.items() if other in r["jobs"]]
            rank_ips = {r["ip"]: r["node_id"] for r in reports[host_id]["worker_nodes"]}
            other_ips = {r["ip"] for r in reports[other_host]["worker_nodes"]}
            assert len(rank_ips) == 2 and not other_ips & set(rank_ips), reports
            victim_ip = sorted(rank_ips)[0]
            victim = rank_ips[victim_ip]
            at_cut = {j: max(steps(j)) for j in [*packed, other]}
            assert all(at_cut[j] < LINK_STEPS for j in packed), at_cut  # cut mid-training
            ip("link", "set", outside_veth(NODE_IPS.index(victim_ip)), "down")

            def alive(node_id: str) -> bool:
                return any(n["Alive"] for n in ray.nodes() if n["NodeID"] == node_id)

            # The partition: the cut node is not declared dead yet, and the other host
            # steps on, its steps stored by the scheduler's ticks (the API reads them).
            wait_for_condition(
                lambda: max(steps(other)) >= at_cut[other] + 3,
                timeout=60,
                interval=0.2,
                what="the other host stepping while the node is cut off",
            )
            assert alive(victim), "declared dead before the other host was seen stepping"
            stalled = {j: max(steps(j)) for j in packed}
            wait_for_condition(
                lambda: not alive(victim), timeout=120, what="the node declared dead"
            )

            for job_id in [*packed, other]:
                job = server.wait_until_terminal(client, job_id, timeout=400)
                assert job["status"] == "succeeded", job
            for job_id in packed:
                evts = server.all_events(client, job_id)
                said = "\n".join(e["message"] for e in evts if e["type"] != "metrics")
                # Placed once, on the one host, first attempt: not requeued by the loss.
                placed = {
                    (e["data"]["run_id"], e["data"].get("attempt", 1))
                    for e in evts
                    if "run_id" in (e["data"] or {})
                }
                assert placed == {(host_id, 1)}, said
                assert said.count("Adapter published") == 1, said
                lost = [e for e in evts if "was lost" in e["message"]]
                assert lost and victim[:8] in lost[0]["message"], said
                after = evts[evts.index(lost[0]) :]
                (again,) = [e for e in after if e["message"].startswith("Training started")]
                resumed = again["data"]["resumed_from_step"] or 0
                assert 3 <= resumed <= stalled[job_id], (resumed, stalled, said)
                assert f"resumed from step {resumed}" in again["message"], again
                # Every step after the checkpoint trained once more, and none twice after.
                assert steps_of(after) == list(range(resumed + 1, LINK_STEPS + 1)), said
            other_steps = steps(other)
            assert other_steps == list(range(1, len(other_steps) + 1))  # never restarted
            after = hosts.poll(host_id, {})
            assert after is not None  # still warm: its ranks left the cut node
            assert victim not in {r["node_id"] for r in after["worker_nodes"]}, after

            # The first interrupted job against its uninterrupted twin (same settings and
            # seed), trained now on the nodes left.
            twin = submit(client, **fields[1])["id"]
            job = server.wait_until_terminal(client, twin, timeout=300)
            assert job["status"] == "succeeded", job
            assert not [e for e in server.all_events(client, twin) if "restarted" in e["message"]]
            worst = worst_difference(
                adapter_tensors(client, packed[0]), adapter_tensors(client, twin)
            )
            print(f"max abs difference from the uninterrupted twin = {worst}")
            assert worst <= 1e-5, f"{packed[0]} differs from its twin by {worst}"
    finally:
        server.stop()
