"""Node loss on a pack host (workers.host.node_loss, pure): which of the last workers' nodes
Ray says are gone and whether they were preempted; a preemption spends each job's preemption
budget, never its restarts; a restart that Ray explains only later is amended."""

from __future__ import annotations

from typing import Any

from core.host_protocol import NodeRef
from core.run_states import RunJobState
from tests.workers.test_membership import boundary, event, host, request
from workers.host.membership import Membership
from workers.host.node_loss import LateLook, LostNode, lost_nodes, preemption

A, B, C = "a" * 56, "b" * 56, "c" * 56
RANKS = [NodeRef(node_id=A, ip="10.0.0.1"), NodeRef(node_id=B, ip="10.0.0.2")]


def node(node_id: str, alive: bool, reason: int = 0, said: str = "") -> dict[str, Any]:
    return {"NodeID": node_id, "Alive": alive, "DeathReason": reason, "DeathReasonMessage": said}


def test_a_node_ended_by_a_drain_is_preempted_and_one_that_crashed_is_lost() -> None:
    # 3: AUTOSCALER_DRAIN_PREEMPTED, 2: UNEXPECTED_TERMINATION (Ray's NodeDeathInfo.Reason)
    drained = lost_nodes(RANKS, [node(A, False, 3, "spot notice"), node(B, True)])
    assert drained == [LostNode(A, "10.0.0.1", preempted=True, said="spot notice")]
    assert preemption(drained) and drained[0].name == "10.0.0.1 (aaaaaaaa)"
    crashed = lost_nodes(RANKS, [node(A, False, 2, "health check failed"), node(B, True)])
    assert [n.preempted for n in crashed] == [False] and not preemption(crashed)
    # Words another tool gave Ray count as a preemption too; a node not listed is lost.
    said = lost_nodes(RANKS, [node(A, False, 1, "Preempted by the cloud provider")])
    assert [(n.node_id, n.preempted) for n in said] == [(A, True), (B, False)]
    assert not preemption(said)  # a crash beside a preemption is still a crash
    assert lost_nodes(RANKS, [node(A, True), node(B, True), node(C, False, 3)]) == []


def two_stepping_jobs(**options: Any) -> Membership:
    membership, _ = host(**options)
    for job_id in ("a", "b"):
        membership.admit(request(job_id))
    boundary(membership)
    boundary(membership, [event("a", "metrics"), event("b", "metrics")], live=["a", "b"])
    return membership


def test_a_preemption_spends_its_own_budget_and_no_restart() -> None:
    membership = two_stepping_jobs(max_job_restarts=0, max_job_preemptions=2)
    preempted = [LostNode(A, "10.0.0.1", preempted=True)]
    for count in (1, 2):
        assert membership.begin_attempt(preempted) == {"restart": count, "end": False}
        for member in membership.running():
            assert (member.restarts, member.preemptions) == (0, count)
            said = member.events[-1]
            assert "node 10.0.0.1 (aaaaaaaa) was preempted" in said["message"]
            assert f"preemption {count} of 2; no restart spent" in said["message"]
            assert said["data"]["preempted"] and said["data"]["lost_nodes"] == [
                RANKS[0]["ip"] + " (aaaaaaaa)"
            ]
        boundary(membership, [event("a", "metrics"), event("b", "metrics")], live=["a", "b"])
    assert membership.restarts_without_step == 0
    membership.begin_attempt(preempted)  # the third: past the preemption budget
    for member in membership.members.values():
        assert (member.state, member.error_code) == (RunJobState.FAILED, "infrastructure")
        assert "preempted 3 times" in (member.error or "")


def test_a_plain_crash_still_spends_a_restart() -> None:
    membership = two_stepping_jobs(max_job_restarts=0)
    membership.begin_attempt([LostNode(A, "10.0.0.1", preempted=False)])
    assert {(m.state, m.error_code) for m in membership.members.values()} == {
        (RunJobState.FAILED, "infrastructure")
    }


def test_a_restart_ray_explains_later_names_the_node_and_moves_a_preemptions_charge() -> None:
    membership = two_stepping_jobs(max_job_restarts=2)
    membership.begin_attempt()  # Ray has not declared the node dead yet
    assert [m.restarts for m in membership.running()] == [1, 1]
    assert all("after a failure" in m.events[-1]["message"] for m in membership.running())
    membership.explain_restart([LostNode(A, "10.0.0.1", preempted=True)])
    for member in membership.running():
        assert (member.restarts, member.preemptions) == (0, 1)
        said = member.events[-1]
        assert said["message"].startswith("Node 10.0.0.1 (aaaaaaaa) was preempted")
        assert "counted as preemption 1 of 10" in said["message"]
    assert membership.restarts_without_step == 0
    membership.explain_restart([LostNode(A, "10.0.0.1", preempted=True)])  # told once only
    assert [m.preemptions for m in membership.running()] == [1, 1]

    boundary(membership, [event("a", "metrics"), event("b", "metrics")], live=["a", "b"])
    membership.begin_attempt()
    membership.explain_restart([LostNode(B, "10.0.0.2", preempted=False)])  # a plain loss
    for member in membership.running():
        assert (member.restarts, member.preemptions) == (1, 1)
        said = member.events[-1]
        assert said["message"] == (
            "Node 10.0.0.2 (bbbbbbbb) was lost: the workers' last restart came from it"
        )
        assert said["data"] == {"lost_nodes": ["10.0.0.2 (bbbbbbbb)"], "time": said["data"]["time"]}


def test_a_late_look_is_due_once_a_second_until_it_is_over() -> None:
    look = LateLook(list(RANKS), until=130.0)
    assert look.due(100.0)
    look.last = 100.0
    assert not look.due(100.5) and look.due(101.0)
    assert not look.due(130.5) and look.over(130.5)
