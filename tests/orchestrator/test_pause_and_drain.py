"""Pause, resume and drain through the scheduler, on in-memory pack hosts (the real host's
membership rules) and a real SQLite store: a job is handed back at a step boundary and
continues from that step, spending no attempt; a drained host admits no one."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import Conflict
from orchestrator.jobs import cancel_job, pause_job, resume_job
from tests.orchestrator.test_host_scheduling import World, make_world, run_until_done

BY = {"tenant": "t1", "key": "key-abc"}


@pytest.fixture()
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


def steps_of(world: World, job_id: str) -> list[int]:
    return [e.data["step"] for e in world.events(job_id) if e.type == "metrics"]


def test_pause_then_resume_continues_from_the_paused_step_with_no_attempt_spent(
    world: World,
) -> None:
    world.hosts.steps_per_job = 5
    job_id = world.submit()
    world.tick()
    world.hosts.step()
    world.hosts.step()
    world.tick()
    assert world.job(job_id).attempt == 1
    with pytest.raises(Conflict, match="only a paused job can be resumed"):
        resume_job(world.store, "t1", job_id, BY)
    assert pause_job(world.store, "t1", job_id, BY).status == "pausing"
    world.tick()  # the host is asked to hand it back at its next boundary
    world.hosts.step()
    world.tick()
    job = world.job(job_id)
    assert job.status == "paused" and job.attempt == 0  # the attempt given back
    messages = [e.message for e in world.events(job_id)]
    assert any("Pause requested by tenant t1, key key-abc" in m for m in messages)
    assert any(m.startswith("Paused at step 2") and "job paused" in m for m in messages)
    assert world.hosts.list_hosts() == [] or all(
        not h.members for h in world.hosts.hosts.values()
    )  # its slot is free
    with pytest.raises(Conflict, match="is paused; only a running job can be paused"):
        pause_job(world.store, "t1", job_id, BY)
    for _ in range(3):  # paused: the scheduler leaves it alone
        world.tick()
        world.hosts.step()
    assert world.job(job_id).status == "paused"
    assert resume_job(world.store, "t1", job_id, BY).status == "queued"
    run_until_done(world, [job_id])
    job = world.job(job_id)
    assert job.status == "succeeded" and job.attempt == 1
    assert steps_of(world, job_id) == [1, 2, 3, 4, 5]  # from step 2 on, nothing twice
    assert any("Resumed by tenant t1, key key-abc" in e.message for e in world.events(job_id))


def test_pause_of_a_job_not_running_is_a_conflict_naming_its_state(world: World) -> None:
    job_id = world.submit()
    with pytest.raises(Conflict, match="is queued; only a running job can be paused"):
        pause_job(world.store, "t1", job_id, BY)
    run_until_done(world, [job_id])
    with pytest.raises(Conflict, match="is succeeded; only a running job can be paused"):
        pause_job(world.store, "t1", job_id, BY)


def test_cancel_works_while_pausing_and_while_paused(world: World) -> None:
    world.hosts.steps_per_job = 50
    pausing, paused = world.submit(), world.submit()
    world.tick()
    world.hosts.step()
    world.tick()
    pause_job(world.store, "t1", paused, BY)
    world.tick()
    world.hosts.step()
    world.tick()
    assert world.job(paused).status == "paused"
    assert cancel_job(world.store, "t1", paused).status == "cancelled"
    pause_job(world.store, "t1", pausing, BY)
    assert cancel_job(world.store, "t1", pausing).status == "cancelling"
    run_until_done(world, [pausing])
    assert world.job(pausing).status == "cancelled"


def test_a_drained_host_hands_both_jobs_back_and_they_go_on_elsewhere(world: World) -> None:
    world.hosts.steps_per_job = 6
    a, b = world.submit(), world.submit()
    world.tick()
    for _ in range(3):
        world.hosts.step()
    world.tick()
    drained = world.job(a).run_id or ""
    assert world.job(b).run_id == drained
    world.hosts.drain(drained, "Drained from pack host " + drained)
    third = world.submit()
    world.hosts.step()  # the boundary: both checkpointed at step 3 and handed back
    world.tick()
    for job_id in (a, b):
        messages = [e.message for e in world.events(job_id)]
        assert any(f"Drained from pack host {drained} at step 3" in m for m in messages)
        requeued = "job requeued to continue from there (attempt 1 not spent)"
        assert any(requeued in m for m in messages)
    run_until_done(world, [a, b, third])
    for job_id in (a, b):
        job = world.job(job_id)
        assert job.status == "succeeded" and job.attempt == 1
        assert job.run_id != drained
        assert steps_of(world, job_id) == [1, 2, 3, 4, 5, 6]
    assert world.job(third).run_id != drained  # no one joined the drained host


def test_a_host_with_a_rank_on_a_draining_node_is_drained(world: World) -> None:
    job_id = world.submit()
    world.tick()
    host_id = world.job(job_id).run_id or ""
    # The fake's reports name no nodes: give this host's a node, as a real host's does.
    poll = world.hosts.poll

    def with_nodes(host: str, cursors: dict[str, int]):  # type: ignore[no-untyped-def]
        report = poll(host, cursors)
        if report is not None and host == host_id:
            report["worker_nodes"] = [{"node_id": "n1" * 8, "ip": "10.0.0.7"}]
        return report

    world.hosts.poll = with_nodes  # type: ignore[method-assign]
    world.hosts.draining = {"n1" * 8: "10.0.0.7"}
    world.tick()
    assert ("drain", host_id) in world.hosts.calls
    world.hosts.step()
    world.tick()
    messages = [e.message for e in world.events(job_id)]
    assert any("Drained from node 10.0.0.7 (n1n1n1n1) at step" in m for m in messages)
