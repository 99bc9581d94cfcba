"""Draining, the operator's side (`lorafleet hosts drain NODE|HOST`): a pack host, or every
host with a rank on a node, admits nothing more, checkpoints each job at its next step
boundary and hands it back (requeued, no attempt spent); then it ends.

A node is drained through Ray's own drain (the call `ray drain-node` makes; Ray has no public
Python call for it): Ray then places nothing new there, the scheduler's placement skips a
draining node, and its watch drains every host with a rank there (`HostWatch._drain_hosts`),
which is also what happens when Ray or its autoscaler drains a node by itself. The hosts
there are drained here as well, so the hand-back starts without waiting for a tick.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, cast

from core.host_protocol import HOST_PREFIX, HostReport, host_actor_name
from orchestrator.settings import Settings

POLL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class HostSeen:
    """A pack host as its own report has it: its actor's node and each rank's."""

    host_id: str
    nodes: frozenset[str]  # node ids: the actor's and every rank's
    jobs: int  # running jobs
    draining: str | None = None  # why, when it drains


def drain_reason(node_ip: str, node_id: str) -> str:
    """The words a drained node's jobs carry ("Drained from node 10.0.0.5 (ab12cd34)")."""
    return f"Drained from node {node_ip} ({node_id[:8]})"


def hosts_to_drain(reports: list[HostReport], draining_nodes: dict[str, str]) -> dict[str, str]:
    """Host id -> why, for each live host not draining yet with its actor or a rank on a
    node Ray drains (`draining_nodes`: node id -> IP)."""
    drains = {}
    for report in reports:
        if report.get("draining") or not report["alive"]:
            continue
        nodes = [*report.get("worker_nodes", []), *([report["node"]] if "node" in report else [])]
        for node in nodes:
            if node["node_id"] in draining_nodes:
                drains[report["host_id"]] = drain_reason(node["ip"], node["node_id"])
                break
    return drains


def connect(settings: Settings) -> None:
    """Joins the scheduler's Ray as a driver: the cluster given by address, else the data
    dir's embedded one (never starts one: with no Ray there is nothing to drain)."""
    import ray

    from orchestrator.scheduling import embedded_ray

    if ray.is_initialized():
        return
    address = settings.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        recorded = embedded_ray.read_record(settings.data_dir)
        if recorded is None or not recorded.alive():
            raise LookupError(f"no Ray is running for {settings.data_dir}: nothing to drain")
        address = recorded.address
    ray.init(address=address, namespace=settings.ray_namespace, log_to_driver=False)


def hosts_seen(namespace: str) -> list[HostSeen]:
    """Every pack host in the namespace that answers its poll."""
    import ray

    named = [
        entry["name"].removeprefix(HOST_PREFIX)
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == namespace and entry["name"].startswith(HOST_PREFIX)
    ]
    seen: list[HostSeen] = []
    for host_id in sorted(named):
        try:
            actor = ray.get_actor(host_actor_name(host_id), namespace=namespace)
            report = cast(dict[str, Any], ray.get(actor.poll.remote({}), timeout=POLL_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - gone or silent: nothing of it to drain
            continue
        nodes = {n["node_id"] for n in report.get("worker_nodes", [])}
        if "node" in report:
            nodes.add(report["node"]["node_id"])
        running = sum(1 for j in report["jobs"].values() if j["state"] == "running")
        seen.append(HostSeen(host_id, frozenset(nodes), running, report.get("draining")))
    return seen


def find_node(target: str) -> tuple[str, str] | None:
    """(node id, IP) of the alive node named by `target`: its id, an id prefix of at least
    8 characters, or its IP; None if none is."""
    import ray

    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        node_id, ip = node["NodeID"], node["NodeManagerAddress"]
        if target in (node_id, ip) or (len(target) >= 8 and node_id.startswith(target)):
            return node_id, ip
    return None


def drain(target: str, settings: Settings) -> list[str]:
    """Drains the host `target` (host-…) or every host on the node `target`; returns the
    host ids told to drain. Raises LookupError when `target` names neither."""
    connect(settings)
    namespace = settings.ray_namespace
    hosts = hosts_seen(namespace)
    if target.startswith("host-"):
        if target not in {h.host_id for h in hosts}:
            raise LookupError(f"no pack host {target} in namespace {namespace}")
        _drain_host(target, namespace, f"Drained from pack host {target}")
        return [target]
    node = find_node(target)
    if node is None:
        raise LookupError(f"{target} is neither a pack host (host-…) nor an alive Ray node")
    node_id, ip = node
    why = drain_reason(ip, node_id)
    _ray_drain_node(node_id, why)
    drained = [h.host_id for h in hosts if node_id in h.nodes]
    for host_id in drained:
        _drain_host(host_id, namespace, why)
    return drained


def _drain_host(host_id: str, namespace: str, why: str) -> None:
    import ray

    actor = ray.get_actor(host_actor_name(host_id), namespace=namespace)
    ray.get(actor.drain.remote(why), timeout=POLL_TIMEOUT_S)


def _ray_drain_node(node_id: str, why: str) -> None:
    """Ray's drain of a node, as `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` does
    it (always accepted, no deadline): Ray places no new work there from now on."""
    import ray
    from ray.core.generated import autoscaler_pb2

    client = ray._raylet.GcsClient(  # type: ignore[attr-defined]
        address=ray.get_runtime_context().gcs_address
    )
    reason = autoscaler_pb2.DrainNodeReason.Value(  # type: ignore[attr-defined]
        "DRAIN_NODE_REASON_PREEMPTION"
    )
    accepted, refusal = client.drain_node(node_id, reason, why, 0)
    if not accepted:
        raise RuntimeError(f"Ray refused to drain node {node_id}: {refusal}")
