"""Hand-back on a pack host (workers.host.membership), pure: a pause hands back one job, a
drain every job, each checkpointed at its next step boundary; the job's state on the host
becomes handed_back and the same attempt may come back (it was given back)."""

from __future__ import annotations

from core.run_states import RunJobState
from orchestrator.scheduling.drain import hosts_to_drain
from tests.workers.test_membership import boundary, event, host, joined, request

RUNNING, HANDED_BACK = RunJobState.RUNNING, RunJobState.HANDED_BACK


def test_a_paused_job_leaves_at_the_next_boundary_once_checkpointed() -> None:
    membership, _ = host()
    for job_id in ("a", "b"):
        membership.admit(request(job_id))
    assert joined(boundary(membership)) == ["a", "b"]
    membership.hand_back("a", "Paused")
    changes = boundary(membership, live=["a", "b"])
    # Handed back, not stopped: the workers checkpoint it before it leaves.
    assert changes["hand_back"] == ["a"] and changes["stop"] == []
    # Until the workers say it is checkpointed it stays running and is asked again.
    assert membership.members["a"].state is RUNNING
    assert boundary(membership, live=["b"])["hand_back"] == ["a"]
    membership.hand_back("a", "Paused again")  # asking twice changes nothing
    boundary(membership, [event("a", "handed_back", step=7)], live=["b"])
    report = membership.job_reports({})["a"]
    assert report["state"] is HANDED_BACK and report["error"] == "Paused at step 7"
    said = report["events"][-1]
    assert said["type"] == "handed_back" and said["data"]["step"] == 7
    assert "no attempt spent" in said["message"]
    # Its pack-mate trains on; the freed slot's late events are dropped.
    assert membership.members["b"].state is RUNNING
    boundary(membership, [event("a", "metrics", step=8)], live=["b"])
    assert len(membership.members["a"].events) == len(report["events"])
    assert boundary(membership, live=["b"])["hand_back"] == []


def test_the_same_attempt_is_taken_again_after_a_hand_back() -> None:
    membership, _ = host()
    membership.admit(request("a"))
    boundary(membership)
    membership.hand_back("a", "Paused")
    boundary(membership, [event("a", "handed_back", step=3)])
    # The attempt was given back: the scheduler's next claim is the same attempt number.
    assert membership.admit(request("a", attempt=1)).admitted
    assert joined(boundary(membership)) == ["a"]


def test_a_job_not_on_the_workers_yet_is_handed_back_at_once() -> None:
    membership, _ = host()
    membership.admit(request("a"))
    membership.hand_back("a", "Paused")
    report = membership.job_reports({})["a"]
    assert report["state"] is HANDED_BACK and report["events"][-1]["data"]["step"] is None
    assert "continues from its newest checkpoint" in report["events"][-1]["message"]


def test_a_hand_back_outlives_a_worker_restart() -> None:
    membership, _ = host()
    membership.admit(request("a"))
    boundary(membership)
    membership.hand_back("a", "Paused")
    membership.begin_attempt()  # the workers died before they checkpointed it
    changes = boundary(membership)
    assert joined(changes) == [] and membership.members["a"].state is HANDED_BACK


def test_a_drain_admits_no_one_and_hands_every_job_back_then_ends() -> None:
    membership, _ = host()
    for job_id in ("a", "b"):
        membership.admit(request(job_id))
    boundary(membership)
    membership.drain("Drained from node 10.0.0.5 (ab12cd34)")
    assert membership.admit(request("c")).reason == "draining"
    changes = boundary(membership, live=["a", "b"])
    assert changes["hand_back"] == ["a", "b"] and not changes["end"]
    events = [event(j, "handed_back", step=5) for j in ("a", "b")]
    changes = boundary(membership, events)
    assert changes["end"]  # nobody left: the workers leave
    for job_id in ("a", "b"):
        report = membership.job_reports({})[job_id]
        assert report["error"] == "Drained from node 10.0.0.5 (ab12cd34) at step 5"


def test_hosts_with_a_rank_on_a_draining_node_are_drained() -> None:
    def report(host_id: str, ranks: list[str], **extra: object) -> dict[str, object]:
        nodes = [{"node_id": n, "ip": f"10.0.0.{i}"} for i, n in enumerate(ranks)]
        head = {"node_id": "head", "ip": "10.0.0.100"}
        return {"host_id": host_id, "alive": True, "worker_nodes": nodes, "node": head, **extra}

    reports = [
        report("host-1", ["n1", "n2"]),
        report("host-2", ["n2", "n3"]),
        report("host-3", ["n3"]),
        report("host-4", ["n1"], draining="Drained already"),
    ]
    drains = hosts_to_drain(reports, {"n1": "10.0.0.0"})  # type: ignore[arg-type]
    assert drains == {"host-1": "Drained from node 10.0.0.0 (n1)"}
    # The host's own node (a control node) draining drains it too.
    assert set(hosts_to_drain(reports, {"head": "10.0.0.100"})) == {  # type: ignore[arg-type]
        "host-1",
        "host-2",
        "host-3",
    }
