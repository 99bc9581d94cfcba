"""A pack host trains with the step settings of the settings object: its spec carries the
loss chunk, gradient checkpointing and the setup time limit; an exclusive host (a
`packing: false` job's) carries the same, with one slot and no idle wait."""

from __future__ import annotations

from pathlib import Path

from orchestrator.scheduling.placement import host_spec
from orchestrator.scheduling.sizing import HostSizing
from orchestrator.settings import Settings
from tests.orchestrator.test_host_scheduling import make_world


def test_hosts_take_the_step_settings_and_the_setup_time_limit_from_the_settings(
    tmp_path: Path,
) -> None:
    world = make_world(
        tmp_path, loss_chunk_tokens=512, gradient_checkpointing=True, setup_timeout_seconds=42
    )
    settings: Settings = world.settings
    shape = HostSizing(settings, lambda: False).shape_of(world.job(world.submit()))
    shared = host_spec(settings, "host-1", shape, warm=False)
    alone = host_spec(settings, "host-2", shape, warm=False, exclusive=True)
    for spec in (shared, alone):
        assert (spec.loss_chunk_tokens, spec.gradient_checkpointing) == (512, True)
        assert spec.setup_timeout_seconds == 42
    assert (shared.exclusive, shared.max_slots) == (False, settings.max_slots_per_host)
    assert (alone.exclusive, alone.max_slots, alone.idle_seconds) == (True, 1, 0.0)
