"""The soak bench's kills (bench/soak.py), one of each kind in turn: the API server, the
scheduler, a training worker process (a rank's pid from its host's report), a worker node
(every process of it SIGKILLed, a fresh node added), a host actor (`ray.kill`). Each kill is
by pid of a process the bench started or of its descendant (bench/soak_cluster.py).
"""

from __future__ import annotations

import os
import random
import signal
import time
from typing import Any

import soak_cluster as sc  # beside this file (bench/ is no package)

KINDS = ("api", "scheduler", "worker", "node", "host")


class Killer:
    """One kill of each kind in turn; a kind that finds nothing training waits for it."""

    def __init__(self, cluster: Any, fleet: sc.Fleet, namespace: str, cpus: int) -> None:
        self.cluster, self.fleet, self.namespace, self.cpus = cluster, fleet, namespace, cpus
        self.rng = random.Random(11)
        self.done: list[str] = []

    def training_hosts(self) -> dict[str, Any]:
        return {
            h: r
            for h, r in sc.host_reports(self.namespace).items()
            if any(j["state"] == "running" for j in r["jobs"].values()) and r["worker_pids"]
        }

    def kill(self, kind: str, patience: float) -> str | None:
        deadline = time.monotonic() + patience
        while True:
            said = getattr(self, f"kill_{kind}")()
            if said is not None or time.monotonic() > deadline:
                if said is not None:
                    self.done.append(f"{kind}: {said}")
                return said
            time.sleep(1)

    def kill_api(self) -> str:
        pid = self.fleet.kill_api()
        began = time.monotonic()
        self.fleet.restart_api()
        return f"API server pid {pid} SIGKILLed; back in {time.monotonic() - began:.1f} s"

    def kill_scheduler(self) -> str:
        pid = self.fleet.kill_scheduler()
        time.sleep(2)  # a gap in which nothing schedules
        self.fleet.start_scheduler()
        return f"scheduler pid {pid} SIGKILLed; started again"

    def kill_worker(self) -> str | None:
        hosts = self.training_hosts()
        if not hosts:
            return None
        host_id = self.rng.choice(sorted(hosts))
        pids = [p for p in hosts[host_id]["worker_pids"] if sc.descends_from_us(p)]
        if not pids:
            return None
        pid = self.rng.choice(pids)
        os.kill(pid, signal.SIGKILL)
        return f"rank pid {pid} of host {host_id} SIGKILLed"

    def kill_node(self) -> str | None:
        reports = self.training_hosts()
        busy = {n["node_id"] for r in reports.values() for n in r.get("worker_nodes", [])}
        victims = [n for n in self.cluster.worker_nodes if n.node_id in busy]
        if not victims:
            return None
        victim = self.rng.choice(victims)
        raylet = victim.all_processes["raylet"][0].process.pid
        fresh = sc.lose_worker_node(self.cluster, victim, self.cpus)
        return (
            f"worker node {victim.node_id[:8]} (raylet pid {raylet}) killed; "
            f"node {fresh.node_id[:8]} added"
        )

    def kill_host(self) -> str | None:
        hosts = self.training_hosts()
        if not hosts:
            return None
        host_id = self.rng.choice(sorted(hosts))
        sc.kill_host_actor(self.namespace, host_id)
        running = sum(j["state"] == "running" for j in hosts[host_id]["jobs"].values())
        return f"host actor {host_id} killed ({running} jobs training on it)"
