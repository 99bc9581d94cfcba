"""Both scheduling modes train a job the same way: a run's spec (window, solo) and a pack
host's spec carry the same step settings, from the same settings, and the run's recipe
trains with them."""

from __future__ import annotations

from pathlib import Path

import torch

from orchestrator.jobs import run_spec_for
from orchestrator.scheduling.placement import host_spec
from orchestrator.scheduling.sizing import HostSizing
from orchestrator.settings import Settings
from tests.orchestrator.test_host_scheduling import make_world
from workers.recipe import PackTrainingRecipe


def test_runs_and_hosts_take_the_loss_chunk_and_gradient_checkpointing_from_the_settings(
    tmp_path: Path,
) -> None:
    world = make_world(tmp_path, loss_chunk_tokens=512, gradient_checkpointing=True)
    settings: Settings = world.settings
    job = world.job(world.submit())
    run = run_spec_for("run-1", [job], settings, use_gpu=False)
    host = host_spec(
        settings, "host-1", HostSizing(settings, lambda: False).shape_of(job), warm=False
    )
    assert (run.loss_chunk_tokens, run.gradient_checkpointing) == (512, True)
    assert (host.loss_chunk_tokens, host.gradient_checkpointing) == (512, True)

    recipe = PackTrainingRecipe(run, reporter=None)
    recipe.rank, recipe.world_size, recipe.device = 0, 1, torch.device("cpu")
    assert recipe.ctx.loss_chunk_tokens == 512
