"""Ray nodes with addresses of their own, so that addressing bugs cannot hide behind a shared
127.0.0.1: four 1-CPU worker nodes each run in a network namespace of their own (a veth pair
into one bridge), the head on the bridge's address. A 2-worker pack host (two jobs) whose
ranks sit on two of those nodes trains: its ranks can only meet over the bridge (a loopback
MASTER_ADDR would reach nobody in the other namespace). A 1-worker host trains on a third node.

Then one rank's node loses its link (its veth taken down). Until Ray declares the node dead
(a partition), the other host keeps stepping and the scheduler keeps storing its steps; then
the first host restarts on the nodes left, both its jobs resume from their checkpoints and
succeed, each started once, and one equals its uninterrupted twin.
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
# A node is declared dead ~16 s after its link goes down: a check every 1 s that gives up
# after 1 s (Ray's default waits 10 s: with packets dropped, not refused, every check waits
# that long), eight failed in a row. Long enough to see another host step meanwhile (a
# partition the cluster is slow to declare), short enough for the stage's budget.
HEALTH_CHECKS = {
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 8,
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
        for k, netns in enumerate(namespaces):
            # The pair by its outer end too: a namespace outlives its name while anything
            # still holds it, and its veth (seen left behind once) with it.
            subprocess.run(["ip", "link", "del", outside_veth(k)], capture_output=True, timeout=30)
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


EPOCHS = 6  # the packed jobs': 6 epochs of batch 4 (36 steps: the cut lands mid-way)
TOTAL_STEPS = EPOCHS * len(DATA) // 4
# The other host's job: long enough to train through the partition on any machine; it is
# cancelled once the partition has been seen.
OTHER_EPOCHS = 100


def job_fields(file_id: str, seed: int, workers: int, epochs: int) -> dict[str, Any]:
    return {
        "model": "tiny-llama",
        "training_file": file_id,
        "seed": seed,
        "resources": {"num_workers": workers},
        "training": {"precision": "fp32"},
        "hyperparameters": {"n_epochs": epochs, "batch_size": 4},
    }


def test_a_two_node_host_trains_over_the_bridge_and_a_lost_link_stalls_no_other_host(
    cluster: Any, tiny_base: Path, tmp_path: Path
) -> None:
    import ray

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
            checkpoint_every_steps="3",
            host_idle_seconds="60",  # the twin trains on the restarted host, warm
        ),
        log=tmp_path / "server.log",
    )
    server.start()
    cut: str | None = None  # the veth taken down
    try:
        with server.client() as client:

            def steps(job_id: str) -> list[int]:
                return steps_of(server.all_events(client, job_id))

            file_id = upload(client, DATA)
            # The long 1-worker job first, training before the packed jobs are submitted: on
            # a quiet machine the packed jobs' 36 steps were over before its host had started.
            other = submit(client, **job_fields(file_id, 3, 1, OTHER_EPOCHS))["id"]
            wait_for_condition(
                lambda: bool(steps(other)), timeout=400, interval=0.5, what="the other job"
            )
            fields = {seed: job_fields(file_id, seed, 2, EPOCHS) for seed in (1, 2)}
            packed = [submit(client, **body)["id"] for body in fields.values()]
            wait_for_condition(
                # Past the second checkpoint (every 3 steps): the first is registered by
                # then (one still in flight when the link goes is lost), so they resume.
                lambda: all(len(steps(j)) >= 7 for j in packed) and bool(steps(other)),
                timeout=400,
                interval=0.5,
                what="all three jobs training",
            )
            hosts = RayHosts(Settings(ray_namespace=NAMESPACE))
            reports = {h: r for h in hosts.list_hosts() if (r := hosts.poll(h, {})) is not None}
            (host_id,) = [h for h, r in reports.items() if set(packed) <= set(r["jobs"])]
            (other_host,) = [h for h, r in reports.items() if other in r["jobs"]]
            assert reports[host_id]["node"]["ip"] == BRIDGE_IP  # on the head (control node)
            rank_ips = {r["ip"]: r["node_id"] for r in reports[host_id]["worker_nodes"]}
            other_ips = {r["ip"] for r in reports[other_host]["worker_nodes"]}
            # Two ranks, two namespaces: they met over the bridge, not on loopback.
            assert len(rank_ips) == 2 and set(rank_ips) <= set(NODE_IPS), rank_ips
            assert not other_ips & set(rank_ips), reports
            victim_ip = sorted(rank_ips)[0]
            victim = rank_ips[victim_ip]
            at_cut = {j: max(steps(j)) for j in [*packed, other]}
            assert all(at_cut[j] < TOTAL_STEPS for j in packed), at_cut  # cut mid-training
            cut = outside_veth(NODE_IPS.index(victim_ip))
            ip("link", "set", cut, "down")

            def alive(node_id: str) -> bool:
                return any(n["Alive"] for n in ray.nodes() if n["NodeID"] == node_id)

            # The partition: while the cut node is not declared dead, the other host steps
            # on, its steps stored by the scheduler's ticks (the API reads them), and a
            # cancel of its job goes through them (the scheduler's call to its host).
            wait_for_condition(
                lambda: max(steps(other)) >= at_cut[other] + 3,
                timeout=60,
                interval=0.2,
                what="the other host stepping while the node is cut off",
            )
            client.post(f"/v1/fine_tuning/jobs/{other}/cancel").raise_for_status()
            job = server.wait_until_terminal(client, other, timeout=60)
            assert job["status"] == "cancelled", job
            assert alive(victim), "declared dead before the other host stepped and stopped"
            stalled = {j: max(steps(j)) for j in packed}
            wait_for_condition(
                lambda: not alive(victim), timeout=120, what="the node declared dead"
            )
            other_steps = steps(other)  # one run, never restarted
            assert other_steps == list(range(1, len(other_steps) + 1)), other_steps
            for job_id in packed:
                job = server.wait_until_terminal(client, job_id, timeout=400)
                assert job["status"] == "succeeded", job
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
                # A checkpoint (every 3 steps) at most one interval past the last step whose
                # metrics were stored when the node went quiet: a step finished as the link
                # went down may have its checkpoint stored before its report (seen: 9 after
                # 8). The twin below checks that resuming there is exact.
                assert resumed % 3 == 0 and 3 <= resumed <= stalled[job_id] + 3, (
                    resumed,
                    stalled,
                    said,
                )
                assert f"resumed from step {resumed}" in again["message"], again
                # Every step after the checkpoint trained once more, none twice after it.
                assert steps_of(after) == list(range(resumed + 1, TOTAL_STEPS + 1)), said
            report = hosts.poll(host_id, {})
            assert report is not None  # still warm: its ranks left the cut node
            assert victim not in {r["node_id"] for r in report["worker_nodes"]}, report

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
        if cut is not None:
            # Back up: the node hears it was declared dead and ends itself, so the cluster's
            # teardown does not wait on a node that cannot reach the head.
            ip("link", "set", cut, "up")
