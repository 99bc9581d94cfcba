"""Ray nodes with addresses of their own, so that addressing bugs cannot hide behind a shared
127.0.0.1: two worker nodes each run in a network namespace of their own (a veth pair into one
bridge), the head on the bridge's address. A 2-worker pack host whose ranks sit on those two
nodes trains a job to the end: its ranks can only meet over the bridge (a loopback
MASTER_ADDR would reach nobody in the other namespace).

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

pytestmark = [pytest.mark.slow, pytest.mark.multinode]
CONTROL = "lorafleet-control"
NAMESPACE = "lorafleet-distinct-ips"
TAG = f"{os.getpid() % 10000}"
SUBNET = ipaddress.ip_network(f"10.77.{os.getpid() % 250}.0/24")
BRIDGE_IP = str(SUBNET[1])
NODE_IPS = [str(SUBNET[11]), str(SUBNET[12])]


def ip(*args: str, netns: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    subprocess.run([*prefix, "ip", *args], check=True, capture_output=True, timeout=30)


def missing() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2 (`ip`)"
    return None


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
            outside, inside = f"lfv{TAG}o{k}", f"lfv{TAG}i{k}"
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
        head_node_args={"num_cpus": 0, "resources": {CONTROL: 1}, "node_ip_address": BRIDGE_IP},
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
            lambda: sum(n["Alive"] for n in ray.nodes()) == 3,
            timeout=120,
            what=f"both nodes (their logs: {logs})",
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
            assert sorted(rank_ips) == sorted(NODE_IPS), report["worker_nodes"]
            job = server.wait_until_terminal(client, job_id, timeout=300)
            assert job["status"] == "succeeded", job
    finally:
        server.stop()
