"""The watchdog's patience with a pack host that is still starting (in memory)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.scheduling.host_scheduling import HOST_START_ALLOWANCE_S
from tests.orchestrator.test_host_scheduling import make_world


def test_a_host_still_starting_gets_the_start_allowance_not_the_step_timeout(
    tmp_path: Path,
) -> None:
    """A host that never stepped is loading its base (minutes on a busy cluster): the
    watchdog waits HOST_START_ALLOWANCE_S for its first step before calling it hung."""
    world = make_world(tmp_path, step_timeout_seconds=30)
    job_id = world.submit()
    world.tick()
    starting = world.job(job_id).run_id or ""
    world.hosts.hang(starting)  # no step at all
    world.clock.shift += 31
    world.tick()
    assert world.job(job_id).run_id == starting and world.job(job_id).attempt == 1
    world.clock.shift += HOST_START_ALLOWANCE_S
    world.tick()
    assert starting not in world.hosts.list_hosts() and world.job(job_id).attempt == 2
