"""The watchdog's patience with a pack host that is still starting (in memory)."""

from __future__ import annotations

from pathlib import Path

from core.host_protocol import SETUP_PHASES
from orchestrator.scheduling.host_watch import host_start_allowance
from tests.orchestrator.test_host_scheduling import make_world


def test_a_host_still_starting_gets_the_setup_allowance_not_the_step_timeout(
    tmp_path: Path,
) -> None:
    """A host that never stepped is loading its base (minutes on a busy cluster): the
    watchdog waits for its first step as long as its setup may take by the setting
    (LORAFLEET_SETUP_TIMEOUT_SECONDS per phase, and one more for the worker group's start)
    before calling it hung; and no longer."""
    world = make_world(tmp_path, step_timeout_seconds=30, setup_timeout_seconds=100)
    allowance = host_start_allowance(world.settings)
    assert allowance == 100 * (len(SETUP_PHASES) + 1)
    job_id = world.submit()
    world.tick()
    starting = world.job(job_id).run_id or ""
    assert world.hosts.started[-1].setup_timeout_seconds == 100  # the host's own limit
    world.hosts.hang(starting)  # no step at all
    world.tick()  # the watch sees the host from now on
    world.clock.shift += allowance - 1
    world.tick()
    assert world.job(job_id).run_id == starting and world.job(job_id).attempt == 1
    world.clock.shift += 2
    world.tick()
    assert starting not in world.hosts.list_hosts() and world.job(job_id).attempt == 2
