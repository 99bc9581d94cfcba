"""Which nodes a pack host and its workers may use, from what Ray says of its nodes (pure: the
Ray calls are in `orchestrator.scheduling.ray_hosts`).

- A host's actor, and the Ray Train controller it drives (which Ray puts on the caller's
  node), live on a control node: one the operator marks with the control resource
  (`Settings.control_resource`, e.g. `ray start --resources='{"lorafleet-control": 1}'`), or
  else the head. A worker node may be lost or drained; a control node holds every job of its
  hosts, so it must be one the operator keeps.
- Free resources count only nodes that take new work: a draining node's are not free. A
  node's group marks (`lorafleet-group:…`) count as resources too, so a base's bundles fit
  only on its group's nodes (orchestrator.scheduling.placement.bundles_of).
- What to ask the autoscaler for: the bundles of every host up plus those of each shape that
  fits nowhere (Ray's request is for the whole cluster, not on top of what runs).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from core.host_protocol import NODE_GROUP_PREFIX

Resources = dict[str, float]

HEAD_MARKER = "node:__internal_head__"  # in the head node's resources (Ray's own name)
# What each host takes of the control resource: a mark, not a capacity (a control node holds
# any number of hosts; they use no CPU or GPU of it).
CONTROL_SHARE = 0.001
# Node states that take no new work (autoscaler v2's NodeStatus names).
NOT_TAKING_WORK = {"DRAINING", "DEAD"}
PLACED_KINDS = ("CPU", "GPU")


@dataclass(frozen=True)
class NodeView:
    node_id: str
    ip: str
    status: str  # RUNNING, IDLE, DRAINING, DEAD
    total: Resources = field(default_factory=dict)
    available: Resources = field(default_factory=dict)

    @property
    def takes_work(self) -> bool:
        return self.status not in NOT_TAKING_WORK

    @property
    def is_head(self) -> bool:
        return self.total.get(HEAD_MARKER, 0.0) > 0


def free_per_node(nodes: Iterable[NodeView]) -> list[Resources]:
    """Each node's free CPUs, GPUs and node-group marks, for the nodes that take new work."""
    return [
        {
            kind: float(n.available.get(kind, 0.0))
            for kind in n.total
            if kind in PLACED_KINDS or kind.startswith(NODE_GROUP_PREFIX)
        }
        for n in nodes
        if n.takes_work
    ]


@dataclass(frozen=True)
class HostPlacement:
    """Where a host's actor goes: on a node with `resource` (any of them), or pinned to
    `node_id` (the head); neither when Ray said nothing of its nodes."""

    resource: str | None = None
    node_id: str | None = None

    def describe(self) -> str:
        if self.resource:
            return f"a node with the {self.resource} resource"
        return f"the head node {self.node_id}" if self.node_id else "any node"


def host_placement(nodes: Sequence[NodeView], control_resource: str) -> HostPlacement:
    """Control nodes if any is marked (even if all are busy or draining now: a host then
    waits for one rather than land on a worker node), else the head."""
    if control_resource and any(n.total.get(control_resource, 0) > 0 for n in nodes):
        return HostPlacement(resource=control_resource)
    head = next((n for n in nodes if n.is_head and n.takes_work), None)
    return HostPlacement(node_id=head.node_id) if head else HostPlacement()


def autoscaler_request(
    running: Iterable[list[Resources]], unplaced: Iterable[list[Resources]]
) -> list[Resources]:
    """The bundles to ask the autoscaler for: none while every shape fits (Ray then scales
    as it would), else those of the hosts up and of each waiting shape."""
    waiting = [bundle for bundles in unplaced for bundle in bundles]
    if not waiting:
        return []
    return [bundle for bundles in running for bundle in bundles] + waiting
