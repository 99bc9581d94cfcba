"""The production topology on a real multi-node Ray cluster on one machine
(`ray.cluster_utils.Cluster`: separate raylets and object stores): a head with no CPUs and the
`lorafleet-control` resource, three worker nodes of two CPUs each; PostgreSQL and radosgw; two
API replicas (`serve --no-scheduler`) and the scheduler as its own process (`lorafleet
scheduler`). One cluster and one fleet for the module; its tests run in order.

1. Twelve jobs of two bases train on two pack hosts (one per base) whose ranks sit on two
   worker nodes; one of those nodes loses its raylet (SIGKILL) mid-training while the scheduler
   is SIGKILLed too and started again: all twelve succeed, each started once on its first
   attempt and published once, and two of the interrupted ones equal their uninterrupted
   twins.
2. Capacity: a shape no node has room for waits with its request to the autoscaler visible
   (in Ray's cluster status and in the job's events); a node added starts it within two ticks.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.host_protocol import HOST_PREFIX
from orchestrator.scheduling.node_choice import HEAD_MARKER
from tests.conftest import wait_for_condition
from tests.e2e.conftest import TERMINAL, LorafleetServer
from tests.e2e.test_training_job import DATA, submit, upload
from tests.services.postgres import Postgres
from tests.services.radosgw import RadosGW

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.multinode]
CONTROL = "lorafleet-control"
NAMESPACE = "lorafleet-split-fleet"
POLL_SECONDS = 1.0  # the scheduler's tick (a capacity test counts in ticks)
JOBS_PER_BASE = 6
EPOCHS = 6  # DATA is 24 rows, batch 4: 6 steps an epoch (36 steps: the loss lands mid-way)
TOTAL_STEPS = EPOCHS * len(DATA) // 4
# A node's death is declared within ~3 s (Ray's default: ~15 s), so the host restarts soon.
FAST_HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


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
            "_system_config": FAST_HEALTH_CHECKS,
        },
    )
    workers = [nodes.add_node(num_cpus=2) for _ in range(3)]
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, namespace=NAMESPACE, log_to_driver=False)
    nodes.lorafleet_workers = workers  # type: ignore[attr-defined]
    yield nodes
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == NAMESPACE and entry["name"].startswith(HOST_PREFIX):
            ray.kill(ray.get_actor(entry["name"], namespace=NAMESPACE))
    ray.shutdown()
    nodes.shutdown()


@dataclass
class Fleet:
    """Two API replicas and one scheduler process on one database, object store and Ray."""

    env: dict[str, str]
    folder: Path
    replicas: list[LorafleetServer]
    scheduler: subprocess.Popen[bytes] | None = None
    scheduler_starts: int = 0
    files: dict[str, str] = field(default_factory=dict)

    def start_scheduler(self) -> None:
        self.scheduler_starts += 1
        with open(self.folder / f"scheduler-{self.scheduler_starts}.log", "wb") as log:
            self.scheduler = subprocess.Popen(
                [sys.executable, "-m", "api.cli", "scheduler"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill_scheduler(self) -> None:
        assert self.scheduler is not None
        self.scheduler.send_signal(signal.SIGKILL)
        self.scheduler.wait(timeout=30)

    def scheduler_log(self) -> str:
        return "".join(p.read_text()[-3000:] for p in sorted(self.folder.glob("scheduler-*.log")))

    def stop(self) -> None:
        if self.scheduler is not None and self.scheduler.poll() is None:
            self.scheduler.terminate()
            try:
                self.scheduler.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.scheduler.kill()
                self.scheduler.wait(timeout=30)
        for replica in self.replicas:
            replica.stop()


@pytest.fixture(scope="module")
def fleet(
    cluster: Any,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_base: Path,
    postgres: Postgres,
    radosgw: RadosGW,
) -> Iterator[Fleet]:
    from workers.tiny_base import build_tiny_base

    folder = tmp_path_factory.mktemp("fleet")
    other_base = build_tiny_base(folder / "tiny-other", hidden_size=32, seed=1)
    bucket = f"fleet-{secrets.token_hex(4)}"
    radosgw.client().create_bucket(Bucket=bucket)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LORAFLEET_", "RAY_"))},
        "RAY_ADDRESS": cluster.address,
        "RAY_AUTH_MODE": "disabled",
        "LORAFLEET_DATA_DIR": str(folder / "state"),
        "LORAFLEET_DATABASE_URL": postgres.create_database(f"fleet_{secrets.token_hex(4)}"),
        "LORAFLEET_OBJECT_STORE": f"s3://{bucket}/lorafleet",
        "LORAFLEET_S3_ENDPOINT_URL": radosgw.endpoint_url,
        "LORAFLEET_S3_ACCESS_KEY_ID": radosgw.access_key_id,
        "LORAFLEET_S3_SECRET_ACCESS_KEY": radosgw.secret_access_key,
        "LORAFLEET_BASE_MODELS": json.dumps({"tiny-a": str(tiny_base), "tiny-b": str(other_base)}),
        # Every node is on this machine: the bases' folders are every node's.
        "LORAFLEET_SHARED_PATHS": json.dumps([str(tiny_base.parent), str(folder)]),
        "LORAFLEET_RAY_NAMESPACE": NAMESPACE,
        "LORAFLEET_SCHEDULER_POLL_SECONDS": str(POLL_SECONDS),
        "LORAFLEET_CHECKPOINT_EVERY_STEPS": "3",
        "LORAFLEET_HOST_IDLE_SECONDS": "8",
        "LORAFLEET_MAX_CONCURRENT_RUNS": "4",  # a safety cap only: the nodes' room decides
        "LORAFLEET_MAX_ACTIVE_JOBS_PER_TENANT": "100",
    }
    replicas = [
        LorafleetServer(
            env=env, log=folder / f"replica-{i}.log", extra_args=("--no-scheduler",), s3=radosgw
        )
        for i in range(2)
    ]
    fleet = Fleet(env=env, folder=folder, replicas=replicas)
    try:
        for replica in replicas:
            replica.start()
        fleet.start_scheduler()
        with replicas[0].client() as client:
            fleet.files["data"] = upload(client, DATA)
        yield fleet
    finally:
        fleet.stop()


def events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """Every event of the job, oldest first (through the paginated endpoint)."""
    found: list[dict[str, Any]] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
        page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
        found.extend(page["data"])
        if not page["has_more"]:
            return found[::-1]
        after = page["data"][-1]["id"]


def steps_of(evts: list[dict[str, Any]]) -> list[int]:
    return [e["data"]["step"] for e in evts if e["type"] == "metrics"]


def status(client: httpx.Client, job_id: str) -> str:
    return str(client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"])


def wait_status(
    client: httpx.Client,
    job_id: str,
    wanted: set[str],
    timeout: float,
    log: Callable[[], str] = str,
) -> None:
    """Waits for the job to reach one of `wanted`; a timeout says `log()` (read then)."""
    try:
        wait_for_condition(lambda: status(client, job_id) in wanted, timeout=timeout, interval=0.5)
    except AssertionError:
        raise AssertionError(f"{job_id} not {'/'.join(sorted(wanted))}\n{log()}") from None


def adapter_tensors(client: httpx.Client, job_id: str) -> dict[str, Any]:
    from safetensors.torch import load

    archive = client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", follow_redirects=True)
    assert archive.status_code == 200, archive.text[:500]
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        member = tar.extractfile("adapter_model.safetensors")
        assert member is not None
        return dict(load(member.read()))


def worst_difference(ours: dict[str, Any], twin: dict[str, Any]) -> float:
    assert ours.keys() == twin.keys() and ours
    return max(float((ours[k] - twin[k]).abs().max()) for k in ours)


def host_reports() -> dict[str, Any]:
    """Each pack host of the namespace, as it reports itself (its node, each rank's node)."""
    from orchestrator.scheduling.ray_hosts import RayHosts
    from orchestrator.settings import Settings

    hosts = RayHosts(Settings(ray_namespace=NAMESPACE))
    return {h: r for h in hosts.list_hosts() if (r := hosts.poll(h, {})) is not None}


def job_fields(fleet: Fleet, base: str, seed: int, **more: Any) -> dict[str, Any]:
    return {
        "model": base,
        "training_file": fleet.files["data"],
        "seed": seed,
        "resources": {"num_workers": 2},
        "training": {"precision": "fp32"},
        "hyperparameters": {"n_epochs": EPOCHS, "batch_size": 4},
        **more,
    }


def test_twelve_jobs_survive_a_lost_worker_node_and_a_killed_scheduler(
    cluster: Any, fleet: Fleet
) -> None:
    import ray

    first, second = fleet.replicas
    fields = {
        (base, seed): job_fields(fleet, base, seed)
        for base in ("tiny-a", "tiny-b")
        for seed in range(1, JOBS_PER_BASE + 1)
    }
    with first.client() as one, second.client() as two:
        # Half through each replica; each replica sees all of them.
        jobs = {
            key: submit(one if n % 2 else two, **body)["id"]
            for n, (key, body) in enumerate(fields.items())
        }
        ids = set(jobs.values())
        wait_for_condition(
            # Past the first checkpoints (every 3 steps), so some resume from one.
            lambda: all(len(steps_of(events(one, j))) >= 4 for j in ids),
            timeout=400,
            interval=0.5,
            what="all 12 jobs training",
        )
        reports = host_reports()
        assert len(reports) == 2, reports  # one host per base
        alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        (head,) = [i for i, n in alive.items() if HEAD_MARKER in n["Resources"]]
        rank_nodes = {r["node_id"] for rep in reports.values() for r in rep["worker_nodes"]}
        assert len(rank_nodes) >= 2 and head not in rank_nodes, reports
        assert {rep["node"]["node_id"] for rep in reports.values()} == {head}  # control node
        assert {j for rep in reports.values() for j in rep["jobs"]} == ids

        # The victim: a worker node with ranks of the host holding the most unfinished jobs.
        (victim_host, victim_report) = max(
            reports.items(),
            key=lambda item: sum(status(one, j) == "running" for j in item[1]["jobs"]),
        )
        victim_nodes = {r["node_id"] for r in victim_report["worker_nodes"]}
        (victim,) = [n for n in cluster.lorafleet_workers if n.node_id in victim_nodes][:1]
        at_loss = {j: (status(one, j), max(steps_of(events(one, j)))) for j in ids}
        interrupted = sorted(
            j
            for j in victim_report["jobs"]
            if at_loss[j][0] == "running" and at_loss[j][1] < TOTAL_STEPS
        )
        assert len(interrupted) >= 2, at_loss  # the loss comes mid-training
        raylet = victim.all_processes["raylet"][0].process  # a process this test started
        os.kill(raylet.pid, signal.SIGKILL)
        # Reaped, as its parent would on a real node: until then it is a zombie, which its
        # workers (they watch their raylet's pid) take for alive, and they would train on.
        raylet.wait(timeout=30)
        fleet.kill_scheduler()  # during the node loss: it learns of it only when back

        def declared_dead() -> bool:
            return not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == victim.node_id)

        wait_for_condition(declared_dead, timeout=120, what="the victim node declared dead")
        fleet.start_scheduler()

        for job_id in ids:
            wait_status(two, job_id, TERMINAL, 400, fleet.scheduler_log)
        resumed_at: dict[str, int] = {}  # interrupted job -> the step it resumed from
        for job_id in sorted(ids):
            evts = events(two, job_id)
            said = "\n".join(e["message"] for e in evts if e["type"] != "metrics")
            assert status(one, job_id) == "succeeded", said
            # Trained once: one start, on its first attempt, on one host; published once.
            placed = {
                (e["data"]["run_id"], e["data"].get("attempt", 1))
                for e in evts
                if "run_id" in (e["data"] or {})
            }
            assert len(placed) == 1 and next(iter(placed))[1] == 1, placed
            assert said.count("Fine-tuning job started") == 1, said
            assert said.count("Adapter published") == 1, said
            steps = steps_of(evts)
            if job_id not in interrupted:  # the scheduler's kill lost and doubled nothing
                assert steps == list(range(1, TOTAL_STEPS + 1)), steps
                continue
            # The loss is named; the job resumed from its checkpoint (or its start) and
            # trained every step after it once more.
            lost = [e for e in evts if "was lost" in e["message"]]
            assert lost and victim.node_id[:8] in lost[0]["message"], said
            after = evts[evts.index(lost[0]) :]
            (again,) = [e for e in after if e["message"].startswith("Training started")]
            resumed = again["data"]["resumed_from_step"] or 0
            if resumed:
                assert f"resumed from step {resumed}" in again["message"], again
            assert steps_of(after) == list(range(resumed + 1, TOTAL_STEPS + 1)), steps
            assert sorted(set(steps)) == list(range(1, TOTAL_STEPS + 1)), steps
            resumed_at[job_id] = resumed
        assert any(resumed_at.values()), resumed_at  # at least one resumed from a checkpoint
        # Nothing lost, nothing duplicated, through either replica.
        for client in (one, two):
            listed = client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]
            assert sorted(j["id"] for j in listed) == sorted(ids)

        # Two interrupted jobs against their uninterrupted twins (same settings and seed),
        # trained now on the nodes left.
        by_id = {job_id: key for key, job_id in jobs.items()}
        latest_first = sorted(resumed_at, key=lambda j: (-resumed_at[j], j))
        pairs = {j: submit(one, **fields[by_id[j]])["id"] for j in latest_first[:2]}
        for twin in pairs.values():
            wait_status(two, twin, {"succeeded"}, 300, fleet.scheduler_log)
            assert not [e for e in events(two, twin) if "restarted" in e["message"]]
        for job_id, twin in pairs.items():
            worst = worst_difference(adapter_tensors(one, job_id), adapter_tensors(two, twin))
            print(f"{job_id}: max abs difference from its uninterrupted twin = {worst}")
            assert worst <= 1e-5, f"{job_id} differs from its twin by {worst}"


def requested_of_autoscaler() -> list[dict[str, float]]:
    """What the cluster's autoscaler is asked to make room for, where it reads it: the GCS's
    cluster constraint (autoscaler v2), else the request channel in the GCS's key-value store
    (v1, as KubeRay's autoscaler reads it)."""
    import ray
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.autoscaler.v2.sdk import get_cluster_status
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if is_autoscaler_v2():
        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        return [
            dict(each.bundle)
            for demand in status.resource_demands.cluster_constraint_demand
            for each in demand.bundles_by_count
            for _ in range(each.count)
        ]
    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return list(json.loads(raw)) if raw else []


def free_cpus_per_node() -> dict[str, float]:
    """Free CPUs of each node that takes work, as the scheduler reads them."""
    from orchestrator.scheduling.ray_hosts import RayHosts
    from orchestrator.settings import Settings

    nodes = RayHosts(Settings(ray_namespace=NAMESPACE)).nodes()
    return {n.node_id: n.available.get("CPU", 0.0) for n in nodes if n.takes_work}


def test_a_shape_with_no_room_asks_the_autoscaler_and_starts_when_a_node_joins(
    cluster: Any, fleet: Fleet
) -> None:
    import ray

    # From an idle cluster: the earlier test's hosts have ended (their idle time).
    wait_for_condition(lambda: not host_reports(), timeout=120, what="earlier hosts to end")
    total = ray.cluster_resources()["CPU"]
    wait_for_condition(
        lambda: sum(free_cpus_per_node().values()) == total, timeout=60, what="every CPU free"
    )
    first, second = fleet.replicas
    with first.client() as one, second.client() as two:
        long = {"n_epochs": 100, "batch_size": 4}  # ends by cancel
        holder = submit(one, **job_fields(fleet, "tiny-a", 1, hyperparameters=long))["id"]
        wait_for_condition(lambda: status(two, holder) == "running", timeout=120, what="holder")
        # One worker more than the nodes have beside the holder's host: room for one host only.
        wide = int(total) - 2 + 1
        waiting = submit(
            two,
            **job_fields(fleet, "tiny-b", 1, resources={"num_workers": wide}, hyperparameters=long),
        )["id"]

        def told() -> list[dict[str, Any]]:
            return [e for e in events(one, waiting) if "autoscaler" in e["message"]]

        wait_for_condition(lambda: bool(told()), timeout=60, what="the waiting job told why")
        (said,) = told()
        assert said["data"]["requested_bundles"] == [{"CPU": 1.0}] * wide, said
        # The whole cluster's need (Ray's request is not on top of what runs): the holder's
        # host and the waiting one.
        wait_for_condition(
            lambda: (
                sorted(map(json.dumps, requested_of_autoscaler()))
                == sorted([json.dumps({"CPU": 1.0})] * (2 + wide))
            ),
            timeout=30,
            what=f"the autoscaler asked for {2 + wide} CPU bundles",
        )
        assert status(one, waiting) == "queued"

        node = cluster.add_node(num_cpus=2)
        cluster.lorafleet_workers.append(node)
        wait_for_condition(
            lambda: free_cpus_per_node().get(node.node_id) == 2.0, timeout=60, what="the new node"
        )
        # Within two ticks of the scheduler seeing room (a tick's own work allowed for).
        wait_for_condition(
            lambda: status(two, waiting) == "running",
            timeout=2 * POLL_SECONDS + 3,
            interval=0.1,
            what="the waiting job to start on the new node",
        )
        wait_for_condition(
            lambda: not requested_of_autoscaler(), timeout=30, what="the request withdrawn"
        )
        for job_id in (holder, waiting):
            assert one.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200
        for job_id in (holder, waiting):
            wait_status(two, job_id, {"cancelled"}, 120)
