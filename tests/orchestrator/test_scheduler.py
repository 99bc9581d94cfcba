"""The scheduler's loop over pack hosts (in memory; Ray only for its connection): a job is
validated, placed on a host, trained and finished, and a `packing: false` job beside it
trains on an exclusive host of its own."""

from __future__ import annotations

from pathlib import Path

from orchestrator.scheduling.ray_connection import RayConnection
from orchestrator.scheduling.scheduler import Scheduler
from orchestrator.tables import JobRow
from tests.orchestrator.test_host_scheduling import make_world


def test_the_scheduler_trains_every_job_on_pack_hosts(tmp_path: Path, ray_address: str) -> None:
    world = make_world(tmp_path)
    scheduler = Scheduler(
        world.settings, world.store, world.objects, RayConnection(world.settings), world.hosts
    )
    packed, alone = world.submit(), world.submit(tenant="t2")
    with world.store.sessions.begin() as session:
        row = session.get(JobRow, alone)
        assert row is not None
        row.settings = row.settings.model_copy(update={"packing": False})
    for _ in range(10):
        scheduler.tick()
        if {world.job(j).status for j in (packed, alone)} == {"succeeded"}:
            break
        world.hosts.step()
    jobs = {j: world.job(j) for j in (packed, alone)}
    assert {j.status for j in jobs.values()} == {"succeeded"}
    assert {j.attempt for j in jobs.values()} == {1}
    hosts = {spec.host_id: spec for spec in world.hosts.started}
    assert hosts[jobs[alone].run_id or ""].exclusive
    assert not hosts[jobs[packed].run_id or ""].exclusive
