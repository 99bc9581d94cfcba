"""The scheduler's three modes: "hosts" delegates to the host mode, "solo" runs every job
alone at once, "window" packs jobs that arrive together (today's behaviour)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from orchestrator.scheduling.packing import plan_packs
from orchestrator.scheduling.ray_runs import RayRuns
from orchestrator.scheduling.scheduler import Scheduler, pack_limits
from orchestrator.settings import Settings
from tests.orchestrator.test_host_scheduling import make_world


def queued_job(created_at: float) -> SimpleNamespace:
    resources = {"num_workers": 2, "use_gpu": False}
    return SimpleNamespace(model="tiny", created_at=created_at, settings={"resources": resources})


def test_solo_runs_each_job_alone_at_once_and_window_packs(tmp_path: Path) -> None:
    jobs = [queued_job(100.0), queued_job(100.5), queued_job(101.0)]
    solo = Settings(data_dir=tmp_path, scheduling_mode="solo", pack_window_seconds=5)
    size, window = pack_limits(solo)
    packs = plan_packs(jobs, max_pack_size=size, free_runs=9, now=101.0, window_s=window)
    assert [len(p) for p in packs] == [1, 1, 1]
    windowed = Settings(data_dir=tmp_path, scheduling_mode="window", pack_window_seconds=5)
    size, window = pack_limits(windowed)
    assert plan_packs(jobs, max_pack_size=size, free_runs=9, now=101.0, window_s=window) == []
    packs = plan_packs(jobs, max_pack_size=size, free_runs=9, now=106.0, window_s=window)
    assert [len(p) for p in packs] == [3]


def test_the_scheduler_in_hosts_mode_trains_jobs_on_pack_hosts(
    tmp_path: Path, ray_address: str
) -> None:
    world = make_world(tmp_path, scheduling_mode="hosts")
    runs = RayRuns(world.settings)
    scheduler = Scheduler(world.settings, world.store, world.objects, runs, hosts=world.hosts)
    assert scheduler.host_mode is not None
    job_id = world.submit()
    for _ in range(10):
        scheduler.tick()
        if world.job(job_id).status == "succeeded":
            break
        world.hosts.step()
    job = world.job(job_id)
    assert job.status == "succeeded" and job.run_id in world.hosts.list_hosts()
    # The run path left the host's job alone (it never looked for a run actor of it).
    assert job.attempt == 1
