"""A pack host lost with its preempted node (a control node's spot notice, a drain whose
deadline came first): its jobs requeue spending a preemption of their own budget
(`max_preemptions_per_job`), never an attempt; past the budget they fail naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.host_protocol import NodeRef
from orchestrator.errors import InvalidTransition
from orchestrator.jobs import pause_job
from tests.orchestrator.test_host_scheduling import World, make_world, run_until_done
from workers.host.node_loss import LostNode

NODE = NodeRef(node_id="0123abcd" + "f" * 48, ip="10.0.0.7")


@pytest.fixture()
def world(tmp_path: Path) -> World:
    # One attempt only: a preemption that spent one would fail the job.
    return make_world(tmp_path, max_attempts=1, max_preemptions_per_job=2)


def running_on_node(world: World, job_id: str) -> str:
    """Runs the job's host on NODE and lets the scheduler see it there; its host id."""
    world.tick()
    host_id = world.job(job_id).run_id or ""
    world.hosts.host_nodes[host_id] = NODE
    world.hosts.step()
    world.scheduling.watch()
    return host_id


def preempt(world: World, host_id: str, said: str = "preempted by the spot notice") -> None:
    world.hosts.preempt(host_id, said)
    world.clock.shift += world.settings.run_start_grace_seconds + 1
    world.scheduling.watch()


def test_a_host_lost_with_its_preempted_node_spends_a_preemption_not_an_attempt(
    world: World,
) -> None:
    job_id = world.submit()
    host_id = running_on_node(world, job_id)
    preempt(world, host_id)
    job = world.job(job_id)
    assert (job.status, job.attempt, job.preemptions) == ("queued", 0, 1)
    event = world.events(job_id)[-1]
    assert event.level == "warn"
    assert "preempted (1 of 2; no attempt spent)" in event.message
    assert f"{host_id} on node 10.0.0.7 (0123abcd) disappeared" in event.message
    assert "preempted by the spot notice" in event.message
    assert event.data["preemption"] == 1 and event.data["max_preemptions"] == 2
    run_until_done(world, [job_id])
    job = world.job(job_id)
    assert (job.status, job.attempt, job.preemptions) == ("succeeded", 1, 1)


def test_past_its_preemption_budget_the_job_fails_naming_the_budget(world: World) -> None:
    job_id = world.submit()
    for _ in range(2):
        preempt(world, running_on_node(world, job_id))
        assert world.job(job_id).status == "queued"
    preempt(world, running_on_node(world, job_id))
    job = world.job(job_id)
    assert (job.status, job.error_code, job.preemptions) == ("failed", "infrastructure", 2)
    assert "preempted 3 times" in (job.error_message or "")
    assert "max_preemptions_per_job = 2" in (job.error_message or "")


def test_a_host_lost_with_a_node_that_was_not_preempted_spends_an_attempt(
    tmp_path: Path,
) -> None:
    world = make_world(tmp_path, max_attempts=2)
    job_id = world.submit()
    host_id = running_on_node(world, job_id)
    world.hosts.lose(host_id)  # the node crashed: Ray names no preemption
    world.clock.shift += world.settings.run_start_grace_seconds + 1
    world.scheduling.watch()
    job = world.job(job_id)
    assert (job.status, job.attempt, job.preemptions) == ("queued", 1, 0)
    assert "no attempt spent" not in world.events(job_id)[-1].message


def test_a_silent_host_ended_on_a_preempted_node_spends_a_preemption(world: World) -> None:
    job_id = world.submit()
    host_id = running_on_node(world, job_id)
    world.hosts.stall(host_id)
    world.hosts.preempted[NODE["node_id"]] = ""  # Ray's DeathReason alone, no words
    for _ in range(world.settings.max_run_poll_timeouts):
        world.clock.shift += world.settings.run_poll_timeout_seconds
        world.scheduling.watch()
    job = world.job(job_id)
    assert (job.status, job.attempt, job.preemptions) == ("queued", 0, 1)
    message = world.events(job_id)[-1].message
    assert "did not answer" in message and "its node was preempted)" in message


def test_a_pausing_job_preempted_pauses_with_its_attempt_given_back(world: World) -> None:
    job_id = world.submit()
    host_id = running_on_node(world, job_id)
    pause_job(world.store, "t1", job_id, {"tenant": "t1", "key": "key-abc"})
    preempt(world, host_id)
    job = world.job(job_id)
    assert (job.status, job.attempt) == ("paused", 0)


def test_the_preempted_requeue_is_fenced_by_attempt(world: World) -> None:
    job_id = world.submit()
    running_on_node(world, job_id)
    with pytest.raises(InvalidTransition):
        world.store.requeue_preempted(job_id, 2, "stale", {})
    assert world.job(job_id).preemptions == 0


def test_hosts_lost_and_workers_restarted_by_preemptions_spend_one_budget(world: World) -> None:
    job_id = world.submit()
    preempt(world, running_on_node(world, job_id))
    host_id = running_on_node(world, job_id)
    membership = world.hosts.hosts[host_id].membership
    assert membership.members[job_id].preemptions == 1  # the host counts on from the job's
    # A worker node of the new host is preempted: the host restarts its workers.
    membership.begin_attempt([LostNode("b" * 56, "10.0.0.8", preempted=True)])
    world.scheduling.watch()
    job = world.job(job_id)
    assert (job.status, job.preemptions) == ("running", 2)
    assert "preemption 2 of 2; no restart spent" in world.events(job_id)[-1].message
    preempt(world, host_id)  # the third: past the budget
    job = world.job(job_id)
    assert (job.status, job.error_code) == ("failed", "infrastructure")
    assert "preempted 3 times" in (job.error_message or "")
