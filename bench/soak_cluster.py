"""The soak bench's cluster and fleet (bench/soak.py): a simulated multi-node Ray cluster on
this machine and the lorafleet processes on it, each part something the bench can kill.

- `ray.cluster_utils.Cluster` (what Ray's own multi-node tests use: separate raylets and
  object stores): a head with no CPUs carrying the `lorafleet-control` resource, where pack
  hosts live, and worker nodes for the ranks;
- one API replica (`serve --no-scheduler`) and the scheduler as its own process
  (`lorafleet scheduler`), on SQLite and a local object-store folder: every node is on this
  machine, so its folders are every node's (`LORAFLEET_SHARED_PATHS`). PostgreSQL and S3
  are what the multinode tests soak; the bench needs no service beside the repository.

Kills are by pid of a process the bench started (or of one of their descendants, checked
through /proc), never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api.server_process import ServerProcess

CONTROL = "lorafleet-control"
# A node's death is declared within ~3 s (Ray's default: ~15 s), so a host restarts soon.
FAST_HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
DATA = [{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a in range(6) for b in range(4)]


def start_cluster(workers: int, cpus: int, namespace: str) -> Any:
    """The cluster, with this process connected to it as a driver (on the head)."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # as the embedded Ray (embedded_ray.py)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "resources": {CONTROL: 1},
            "_system_config": FAST_HEALTH_CHECKS,
        },
    )
    for _ in range(workers):
        cluster.add_node(num_cpus=cpus)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=namespace, log_to_driver=False)
    return cluster


def lose_worker_node(cluster: Any, node: Any, cpus: int) -> Any:
    """SIGKILLs every process of a worker node (raylet first; each reaped, as its parent
    would on a real node: a zombie raylet is alive to its workers, which would train on),
    then adds a fresh node of the same size so the capacity stays. Returns the new node."""
    cluster.remove_node(node, allow_graceful=False)  # SIGKILL + wait(), by pid
    return cluster.add_node(num_cpus=cpus)


def descends_from_us(pid: int) -> bool:
    """Whether `pid` is a descendant of this process (a Ray worker of one of our raylets)."""
    ours = os.getpid()
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the parent's pid
        if pid == ours:
            return True
    return False


def host_reports(namespace: str) -> dict[str, Any]:
    """Each pack host of the namespace as it reports itself (its jobs, ranks' pids and nodes)."""
    from orchestrator.scheduling.ray_hosts import RayHosts
    from orchestrator.settings import Settings

    hosts = RayHosts(Settings(ray_namespace=namespace))
    return {h: r for h in hosts.list_hosts() if (r := hosts.poll(h, {})) is not None}


def kill_host_actor(namespace: str, host_id: str) -> None:
    """`ray.kill` of the host's named actor: what a crashed host process looks like."""
    import ray

    from core.host_protocol import host_actor_name

    ray.kill(ray.get_actor(host_actor_name(host_id), namespace=namespace))


def end_hosts(namespace: str) -> None:
    import ray

    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == namespace:
            with contextlib.suppress(ValueError):  # ended meanwhile
                ray.kill(ray.get_actor(entry["name"], namespace=namespace))


def fleet_env(folder: Path, address: str, bases: dict[str, Path], namespace: str) -> dict[str, str]:
    shared = sorted({str(folder), *(str(p.parent) for p in bases.values())})
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LORAFLEET_", "RAY_"))},
        "RAY_ADDRESS": address,
        "RAY_AUTH_MODE": "disabled",
        "LORAFLEET_DATA_DIR": str(folder / "state"),  # SQLite: state/lorafleet.db
        "LORAFLEET_OBJECT_STORE": str(folder / "objects"),
        "LORAFLEET_BASE_MODELS": json.dumps({name: str(p) for name, p in bases.items()}),
        "LORAFLEET_SHARED_PATHS": json.dumps(shared),
        "LORAFLEET_RAY_NAMESPACE": namespace,
        "LORAFLEET_SCHEDULER_POLL_SECONDS": "1.0",
        "LORAFLEET_CHECKPOINT_EVERY_STEPS": "3",
        "LORAFLEET_HOST_IDLE_SECONDS": "30",
        "LORAFLEET_WARM_HOSTS": "1",  # per base: first steps come from a loaded host
        "LORAFLEET_MAX_CONCURRENT_RUNS": "4",  # a safety cap only: the nodes' room decides
        "LORAFLEET_MAX_ACTIVE_JOBS_PER_TENANT": "1000",
    }


@dataclass
class Fleet:
    """One API replica and one scheduler process on one database, object store and Ray."""

    env: dict[str, str]
    folder: Path
    api: ServerProcess = field(init=False)
    scheduler: subprocess.Popen[bytes] | None = None
    scheduler_starts: int = 0

    def __post_init__(self) -> None:
        self.api = ServerProcess(
            env=self.env, log=self.folder / "api.log", extra_args=("--no-scheduler",)
        )

    def start(self) -> None:
        self.api.start()  # migrates the database before the scheduler opens it
        self.start_scheduler()

    def start_scheduler(self) -> None:
        self.scheduler_starts += 1
        with open(self.folder / f"scheduler-{self.scheduler_starts}.log", "wb") as log:
            self.scheduler = subprocess.Popen(
                [sys.executable, "-m", "api.cli", "scheduler"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill_scheduler(self) -> int:
        """SIGKILL (reaped); returns the pid."""
        assert self.scheduler is not None
        pid = self.scheduler.pid
        self.scheduler.send_signal(signal.SIGKILL)
        self.scheduler.wait(timeout=30)
        return pid

    def kill_api(self) -> int:
        """SIGKILL of the API replica (reaped); returns the pid. `restart_api` brings it back
        on the same port, so clients retry where they were."""
        assert self.api.process is not None
        pid = self.api.process.pid
        self.api.kill()
        return pid

    def restart_api(self) -> None:
        self.api.start(same_port=True)

    def stop(self) -> None:
        if self.scheduler is not None and self.scheduler.poll() is None:
            self.scheduler.terminate()
            try:
                self.scheduler.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.scheduler.kill()
                self.scheduler.wait(timeout=30)
        self.api.stop(timeout=60)
