"""A pack host's membership rules (workers.host.membership), pure: what the real host actor
and the scheduler's in-memory fake both run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.host_protocol import AdmissionRequest, HostShape, HostSpec
from core.objectstore import ObjectStoreConfig
from core.run_states import STOP_ALL, RunJobState
from core.spec import JobSpec
from workers.host.membership import Membership
from workers.host.node_loss import LostNode

RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    RunJobState.RUNNING,
    RunJobState.SUCCEEDED,
    RunJobState.FAILED,
    RunJobState.CANCELLED,
)
BASE = "/models/tiny"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def host(**options: Any) -> tuple[Membership, Clock]:
    spec = HostSpec(
        host_id="h1",
        shape=HostShape("tiny", BASE, num_workers=2, use_gpu=False, precision="fp32"),
        object_store=ObjectStoreConfig(url="/tmp/objects"),
        model_cache_dir=Path("/tmp/cache"),
        storage_path=Path("/tmp/ray"),
        **{"max_slots": 3, "idle_seconds": 10.0, **options},
    )
    clock = Clock()
    membership = Membership(spec, clock)
    membership.begin_attempt()
    return membership, clock


def request(job_id: str, attempt: int = 1, base: str = BASE, **options: Any) -> AdmissionRequest:
    job = JobSpec(job_id, "t1", attempt, "tiny", base, f"files/{job_id}.jsonl")
    return AdmissionRequest(job, **options)


def boundary(
    membership: Membership,
    events: tuple[dict[str, Any], ...] | list[dict[str, Any]] = (),
    live: tuple[str, ...] | list[str] = (),
) -> dict[str, Any]:
    status = {"stepped": True, "step": 1, "last_step_at": 0.0, "live": list(live), "pending": []}
    return membership.step_boundary(list(events), status)


def event(job_id: str, kind: str, **data: Any) -> dict[str, Any]:
    return {"job_id": job_id, "type": kind, "message": kind, "data": data}


def joined(changes: dict[str, Any]) -> list[str]:
    return [job.job_id for job in changes["join"]]


def test_admission_says_why_not() -> None:
    membership, _ = host(max_slots=2)
    assert membership.admit(request("a")).admitted
    assert membership.admit(request("a")).reason == "already admitted"
    assert membership.admit(request("x", base="/models/other")).reason == "shape mismatch"
    assert membership.admit(request("b")).admitted
    assert membership.admit(request("c")).reason == "full"
    membership.stop(STOP_ALL)
    assert membership.admit(request("c")).reason == "ending"


def test_an_exclusive_host_takes_one_job() -> None:
    membership, _ = host(exclusive=True)
    assert membership.admit(request("a")).admitted
    assert membership.admit(request("b")).reason == "full"
    membership.stop("a")  # never announced: cancelled at once, and the room is free again
    assert membership.admit(request("b")).admitted


def test_the_memory_budget_counts_the_base_and_every_running_member() -> None:
    membership, _ = host(memory_budget_bytes=1000)
    boundary(membership)  # the workers report the base's shard
    membership.step_boundary([], {"memory": {"base_bytes_per_rank": 400}})
    assert membership.admit(request("a", memory_bytes=300)).admitted
    assert membership.admit(request("b", memory_bytes=301)).reason == "over budget"
    assert membership.admit(request("b", memory_bytes=300)).admitted
    membership.stop("a")
    assert membership.admit(request("c", memory_bytes=300)).admitted  # a's share is free


def test_no_budget_means_no_memory_check() -> None:
    membership, _ = host()
    assert membership.admit(request("a", memory_bytes=10**15)).admitted


def test_a_job_joins_at_the_next_boundary_and_a_stop_waits_for_the_workers() -> None:
    membership, _ = host()
    membership.admit(request("a"))
    assert joined(boundary(membership)) == ["a"]
    assert joined(boundary(membership, live=["a"])) == []
    membership.stop("a")
    assert membership.members["a"].state is RUNNING  # on the workers: they drop it
    assert boundary(membership, live=["a"])["stop"] == ["a"]
    boundary(membership, [event("a", "job_cancelled")])
    assert membership.members["a"].state is CANCELLED


def test_events_are_numbered_per_job_and_an_ended_jobs_late_events_are_dropped() -> None:
    membership, _ = host()
    membership.admit(request("a"))
    boundary(membership)
    boundary(membership, [event("a", "metrics", step=1), event("a", "published")])
    boundary(membership, [event("a", "metrics", step=2)])  # late: dropped
    report = membership.job_reports({"a": 1})["a"]
    assert report["state"] is SUCCEEDED and report["cursor"] == 3
    assert [(e["seq"], e["type"]) for e in report["events"]] == [(1, "metrics"), (2, "published")]


def test_a_failed_event_carries_its_error_and_code() -> None:
    membership, _ = host()
    membership.admit(request("a"))
    boundary(membership)
    failed = event("a", "job_failed", error="boom", error_code="training_error", traceback="tb")
    boundary(membership, [failed])
    member = membership.members["a"]
    assert (member.state, member.error, member.error_code) == (FAILED, "boom", "training_error")


def test_a_newer_attempt_replaces_the_stale_one_after_it_leaves_the_workers() -> None:
    membership, _ = host()
    membership.admit(request("a", attempt=1))
    boundary(membership)
    assert membership.admit(request("a", attempt=2)).admitted
    stale_events = membership.job_reports({})["a"]["events"]
    assert stale_events[0]["message"].startswith("Admitted")  # the new attempt's record
    # The stale attempt is still on the workers: it is stopped first, the new one waits.
    changes = boundary(membership, [event("a", "metrics", step=5)], live=["a"])
    assert changes["stop"] == ["a"] and joined(changes) == []
    changes = boundary(membership, [event("a", "job_cancelled")], live=[])
    assert joined(changes) == ["a"] and changes["join"][0].attempt == 2
    member = membership.members["a"]
    assert member.state is RUNNING and member.attempt == 2
    assert [e["type"] for e in member.events] == ["message"]  # the stale one's were dropped


def test_an_event_stamped_with_another_attempt_is_dropped() -> None:
    membership, _ = host()
    membership.admit(request("a", attempt=2))
    boundary(membership)
    boundary(membership, [event("a", "published", attempt=1)])
    assert membership.members["a"].state is RUNNING


def test_a_fenced_stale_attempt_is_dropped_at_its_next_boundary() -> None:
    membership, _ = host()
    membership.admit(request("a", attempt=1))
    boundary(membership)
    membership.fence("a", 1)  # current: nothing happens
    assert membership.members["a"].state is RUNNING
    membership.fence("a", 2)
    member = membership.members["a"]
    assert member.state is CANCELLED and "stale" in member.events[-1]["message"]
    assert boundary(membership, live=["a"])["stop"] == ["a"]
    assert boundary(membership, live=[])["stop"] == []


def test_a_job_implicated_in_two_crashes_fails_alone_and_its_mates_are_not_charged() -> None:
    membership, _ = host(max_job_restarts=2)
    for job_id in ("a", "b"):
        membership.admit(request(job_id))
    boundary(membership)
    boundary(membership, [event("a", "metrics"), event("b", "metrics")], live=["a", "b"])
    membership.admit(request("c"))
    boundary(membership, live=["a", "b"])  # c joins ... and the workers die
    for crash in (1, 2):
        assert membership.begin_attempt() == {"restart": crash, "end": False}
        assert sorted(joined(boundary(membership))) == (
            ["a", "b", "c"] if crash == 1 else ["a", "b"]
        )
    a, b, c = (membership.members[j] for j in "abc")
    assert (c.state, c.error_code) == (FAILED, "training_error")
    assert "before this job finished a step" in (c.error or "")
    assert a.state is b.state is RUNNING and a.restarts == b.restarts == 0
    assert any("not counted" in e["message"] for e in a.events)


def test_a_crash_nobody_is_singled_out_for_charges_every_member() -> None:
    membership, _ = host(max_job_restarts=1)
    for job_id in ("a", "b"):
        membership.admit(request(job_id))
    boundary(membership)
    boundary(membership, [event("a", "metrics"), event("b", "metrics")], live=["a", "b"])
    membership.begin_attempt()
    assert [m.restarts for m in membership.running()] == [1, 1]
    boundary(membership)
    membership.begin_attempt()
    assert {m.state for m in membership.members.values()} == {FAILED}
    assert {m.error_code for m in membership.members.values()} == {"infrastructure"}


def test_restarts_with_no_step_in_between_end_the_host() -> None:
    membership, _ = host(max_job_restarts=1)
    results = [membership.begin_attempt()["end"] for _ in range(3)]
    assert results == [False, False, True] and membership.ending  # the 3rd restart in a row


def test_a_job_past_its_max_runtime_fails_with_timeout() -> None:
    membership, clock = host()
    membership.admit(request("slow", max_runtime_seconds=30))
    membership.admit(request("late", max_runtime_seconds=30))
    boundary(membership)
    clock.now += 31
    membership.stop("late")  # already stopping: the timeout still wins
    changes = boundary(membership, live=["slow", "late"])
    assert sorted(changes["stop"]) == ["late", "slow"]
    boundary(membership, [event("slow", "job_cancelled")])
    slow = membership.members["slow"]
    assert (slow.state, slow.error_code) == (FAILED, "timeout")
    assert "max_runtime" in (slow.error or "")


@pytest.mark.parametrize("warm", [False, True])
def test_an_idle_host_ends_after_its_idle_seconds_unless_warm(warm: bool) -> None:
    membership, clock = host(warm=warm)
    assert boundary(membership)["end"] is False
    clock.now += 11
    assert boundary(membership)["end"] is (not warm)
    membership.admit(request("a"))  # refused once ending; taken while warm
    assert bool(membership.members) is warm


def test_release_forgets_only_an_ended_job() -> None:
    membership, _ = host()
    membership.admit(request("a"))
    membership.release("a")
    assert "a" in membership.members
    membership.stop("a")
    membership.release("a")
    assert membership.members == {}


def test_a_restart_after_a_node_loss_names_the_node_in_each_jobs_events() -> None:
    membership, _ = host(max_job_restarts=2)
    for job_id in ("a", "b"):
        membership.admit(request(job_id))
    boundary(membership)
    boundary(membership, [event("a", "metrics"), event("b", "metrics")], live=["a", "b"])
    membership.begin_attempt([LostNode("0123abcdef", "10.0.0.7", preempted=False)])
    for member in membership.running():
        (restarted,) = [e for e in member.events if "restarted" in e["message"]]
        assert "node 10.0.0.7 (0123abcd) was lost" in restarted["message"]
        assert restarted["data"]["lost_nodes"] == ["10.0.0.7 (0123abcd)"]
    boundary(membership, [event("a", "metrics"), event("b", "metrics")], live=["a", "b"])
    membership.begin_attempt()  # no node lost this time: the cause is not guessed
    for member in membership.running():
        latest = [e for e in member.events if "restarted" in e["message"]][-1]
        assert "after a failure" in latest["message"] and "lost_nodes" not in latest["data"]
