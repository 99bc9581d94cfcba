"""Why a pack host's workers restarted, as far as Ray can tell (pure, over `ray.nodes()`'s
entries): which nodes the last workers ran on are gone, and whether each was *preempted*
(Ray ended it with a drain: the autoscaler's or `ray drain-node`'s, a spot notice) or lost.
A preemption is charged to a job's preemption budget, not to its restarts
(`workers.host.membership`).

Ray declares a node dead only once its health checks fail (by default ~15 s after it went),
and the new workers may start before that: the restart then names no node. The host looks
again for a while (`LATE_LOOK_S`) and, once Ray says so, tells the jobs which node it was
(`Membership.explain_restart`), moving a preemption's charge where it belongs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.host_protocol import HostSpec, NodeRef
from core.run_states import RunJobState
from workers.host.membership_calls import MembershipCalls

if TYPE_CHECKING:
    from workers.host.membership import Member

# Ray's NodeDeathInfo.Reason (src/ray/protobuf/gcs.proto) of a node its drain ended:
# AUTOSCALER_DRAIN_PREEMPTED (a drain with reason PREEMPTION, with or without a deadline)
# and AUTOSCALER_DRAIN_IDLE. `ray.nodes()` gives it as "DeathReason", with Ray's words as
# "DeathReasonMessage".
DRAIN_DEATH_REASONS = frozenset({3, 4})
# Words of a death that another tool (a cloud's spot notice handler, an operator) gave Ray.
PREEMPTION_WORDS = ("preempt", "drain", "spot")
# How long after a restart that named no node the host keeps looking for one, and how often.
LATE_LOOK_S = 30.0
LATE_LOOK_EVERY_S = 1.0


@dataclass(frozen=True)
class LostNode:
    node_id: str
    ip: str
    preempted: bool
    said: str = ""  # Ray's words for its death, if any

    @property
    def name(self) -> str:
        """How events name it: "10.0.0.7 (0123abcd)"."""
        return f"{self.ip} ({self.node_id[:8]})"


def was_preempted(node: Mapping[str, Any]) -> bool:
    """Whether a dead node of `ray.nodes()` was ended by a drain (a preemption)."""
    said = str(node.get("DeathReasonMessage") or "").lower()
    return node.get("DeathReason") in DRAIN_DEATH_REASONS or any(
        word in said for word in PREEMPTION_WORDS
    )


def lost_nodes(ranks: Sequence[NodeRef], nodes: Iterable[Mapping[str, Any]]) -> list[LostNode]:
    """The nodes of `ranks` (the last workers' nodes) that Ray does not list as alive, once
    each, in rank order; a node Ray no longer lists at all counts as lost, not preempted."""
    listed = {str(n.get("NodeID")): n for n in nodes}
    lost: dict[str, LostNode] = {}
    for rank in ranks:
        node = listed.get(rank["node_id"])
        if rank["node_id"] in lost or (node is not None and node.get("Alive")):
            continue
        lost[rank["node_id"]] = LostNode(
            node_id=rank["node_id"],
            ip=rank["ip"],
            preempted=node is not None and was_preempted(node),
            said=str((node or {}).get("DeathReasonMessage") or ""),
        )
    return list(lost.values())


def preemption(lost: Sequence[LostNode]) -> bool:
    """A restart is a preemption when nodes were lost and every one of them was preempted
    (a crash beside a preemption is still a crash)."""
    return bool(lost) and all(node.preempted for node in lost)


@dataclass
class LateLook:
    """A restart that named no node: the nodes its workers ran on, to look at again until
    `until` (the host's clock), at most once per LATE_LOOK_EVERY_S."""

    ranks: list[NodeRef]
    until: float
    last: float = float("-inf")

    def due(self, now: float) -> bool:
        return now <= self.until and now - self.last >= LATE_LOOK_EVERY_S

    def over(self, now: float) -> bool:
        return now > self.until


class NodeLosses(MembershipCalls):
    """The node-loss half of `workers.host.membership.Membership` (which sets these)."""

    spec: HostSpec
    members: dict[str, Member]
    last_restart_held: dict[str, tuple[int, bool]]  # job id -> (attempt, charged a restart)
    restarts_without_step: int

    def charge_preemption(
        self, member: Member, lost: Sequence[LostNode], late: bool = False
    ) -> None:
        """The member's workers restarted because `lost` were preempted: one preemption of
        its own budget (its restarts untouched), or past that budget it fails. `late`: Ray
        said so only after the restart, whose event named no node."""
        member.preemptions += 1
        names = [node.name for node in lost]
        budget = self.spec.max_job_preemptions
        if member.preemptions > budget:
            error = (
                f"its nodes were preempted {member.preemptions} times, past the job's "
                f"preemption budget (max_preemptions_per_job = {budget})"
            )
            self.fail(member, f"{error} (last: node {', '.join(names)})", "infrastructure")
            return
        count = f"preemption {member.preemptions} of {budget}; no restart spent"
        message = (
            f"Node {', '.join(names)} was preempted: the workers' last restart came from it "
            f"(counted as {count})"
            if late
            else f"Workers restarted after node {', '.join(names)} was preempted ({count}); "
            "resuming from the job's checkpoint"
        )
        self.append(
            member,
            "message",
            message,
            {
                "restart": member.restarts,
                "preempted": True,
                "preemption": member.preemptions,
                "lost_nodes": names,
            },
        )

    def explain_restart(self, lost: Sequence[LostNode]) -> None:
        """Ray now names nodes the last restart's workers ran on as gone, though it did not
        yet when that restart began: each member it held is told, and if they were all
        preempted, a restart charged to a member becomes a preemption (given back to its
        restarts; a crash laid on a member that had just joined is taken off it too)."""
        if not lost:
            return
        names = [node.name for node in lost]
        preempted = preemption(lost)
        held, self.last_restart_held = self.last_restart_held, {}
        if preempted and any(charged for _, charged in held.values()):
            self.restarts_without_step = max(0, self.restarts_without_step - 1)
        implicated = not all(charged for _, charged in held.values())
        for job_id, (attempt, charged) in sorted(held.items()):
            member = self.members.get(job_id)
            if member is None or member.attempt != attempt:
                continue
            if member.state is not RunJobState.RUNNING:
                continue
            if preempted and charged:
                member.restarts -= 1
                if implicated:
                    member.implicated_crashes = max(0, member.implicated_crashes - 1)
                self.charge_preemption(member, lost, late=True)
                continue
            verb = "preempted" if preempted else "lost"
            self.append(
                member,
                "message",
                f"Node {', '.join(names)} was {verb}: the workers' last restart came from it",
                {"lost_nodes": names, **({"preempted": True} if preempted else {})},
            )
