"""`training.packing: false` in hosts mode: such a job trains alone, in a run of its own and
never on a pack host, and its run counts against the same limits as a host does:
`max_concurrent_runs` (hosts and runs together) and the cluster's free resources."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.scheduling.ray_runs import RayRuns
from orchestrator.scheduling.scheduler import Scheduler
from orchestrator.states import JobStatus
from orchestrator.store import new_id
from orchestrator.tables import JobRow
from tests.orchestrator.test_host_scheduling import World, make_world


def unpacked(world: World, tenant: str = "t1") -> str:
    job_id = world.submit(tenant=tenant)
    with world.store.sessions.begin() as session:
        row = session.get(JobRow, job_id)
        assert row is not None
        row.settings = {**row.settings, "packing": False}
    return job_id


def running_alone(world: World) -> str:
    """A `packing: false` job already training in a run of its own."""
    job_id = unpacked(world)
    world.store.claim(job_id, 0, new_id("run"), "Fine-tuning job started (attempt 1)")
    return job_id


def test_a_run_of_its_own_counts_against_max_concurrent_runs(tmp_path: Path) -> None:
    world = make_world(tmp_path, scheduling_mode="hosts", max_concurrent_runs=1)
    running_alone(world)
    packed = world.submit()
    world.tick()
    assert world.job(packed).status == "queued" and world.hosts.started == []
    assert not world.scheduling.room_for_runs.take(
        world.scheduling.sizing.shape_of(world.job(packed))
    )


def test_hosts_leave_runs_only_the_starts_and_resources_they_did_not_take(
    tmp_path: Path,
) -> None:
    world = make_world(tmp_path, scheduling_mode="hosts", max_concurrent_runs=2)
    first = world.submit()
    world.tick()  # one host: one start of two left, 1022 of 1024 CPUs free
    shape = world.scheduling.sizing.shape_of(world.job(first))
    room = world.scheduling.room_for_runs
    assert room.starts == 1 and room.take(shape) and not room.take(shape)

    (tmp_path / "crowded").mkdir()
    crowded = make_world(tmp_path / "crowded", scheduling_mode="hosts", max_concurrent_runs=9)
    crowded.hosts.nodes = [{"CPU": 3.0}]  # a host of 2 workers leaves 1 CPU
    crowded.submit()
    crowded.tick()
    assert len(crowded.hosts.started) == 1
    room = crowded.scheduling.room_for_runs
    assert room.starts == 8 and not room.take(shape)


@pytest.mark.slow
def test_the_scheduler_runs_an_unpacked_job_alone_within_the_limits(
    tmp_path: Path, ray_address: str
) -> None:
    """Real Ray for the run side: the first `packing: false` job gets a run of its own (the
    run's actor exists), the second waits, as one host and one run fill max_concurrent_runs."""
    world = make_world(tmp_path, scheduling_mode="hosts", max_concurrent_runs=2)
    runs = RayRuns(world.settings)
    runs.connect()
    scheduler = Scheduler(world.settings, world.store, world.objects, runs, hosts=world.hosts)
    packed, alone, waiting = world.submit(), unpacked(world), unpacked(world, tenant="t2")
    scheduler.tick()
    try:
        jobs = {j: world.job(j) for j in (packed, alone, waiting)}
        assert jobs[packed].run_id in world.hosts.list_hosts()
        host_jobs = {m for h in world.hosts.hosts.values() for m in h.members}
        assert host_jobs == {packed}  # never an unpacked job on a host
        run_id = jobs[alone].run_id
        assert jobs[alone].status == "running" and run_id is not None
        assert run_id.startswith("run-") and runs._actor(run_id) is not None
        assert jobs[waiting].status == "queued"
        scheduler.tick()
        assert world.job(waiting).status == "queued"
    finally:
        for job in world.store.jobs_with_status([JobStatus.RUNNING]):
            if job.run_id and job.run_id.startswith("run-"):
                runs.kill(job.run_id)
