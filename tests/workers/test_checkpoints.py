"""Checkpoints read back safely and portably: plain data only (weights_only), onto the CPU,
and a dropout RNG state from another device type or world size re-seeds instead of failing."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from core.checkpoint_index import list_checkpoints
from core.objectstore import LocalObjectStore
from workers.training.checkpoints import UnsafeCheckpointError, read_checkpoint, write_checkpoint
from workers.training.rng_state import reseed_for, restore_dropout_rng, saved_dropout_rng


class Payload:
    """Stands in for an attacker's object: unpickling it could run any code."""


def trained_state() -> dict[str, object]:
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    param.sum().backward()
    optimizer.step()
    schedule.step()
    rng = [torch.Generator().manual_seed(r).get_state() for r in range(2)]
    return {
        "step": 1,
        "trained_tokens": 10,
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "dropout_rng": saved_dropout_rng(rng, "cpu"),
    }


def write(tmp_path: Path, state: dict[str, object]) -> LocalObjectStore:
    store = LocalObjectStore(tmp_path / "objects")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(adapter / "adapter_model.safetensors"))
    write_checkpoint(store, "t", "job", 1, adapter, state, {"step": 1}, created_at=0, attempt=1)
    return store


def test_a_real_training_state_round_trips_as_plain_data(tmp_path: Path) -> None:
    state = trained_state()
    store = write(tmp_path, state)
    tensors, loaded = read_checkpoint(store, list_checkpoints(store, "t", "job")[0])
    assert torch.equal(tensors["w"], torch.zeros(2))
    assert loaded["step"] == 1 and loaded["schedule"] == state["schedule"]
    exp_avg = loaded["optimizer"]["state"][0]["exp_avg"]
    assert exp_avg.device.type == "cpu" and exp_avg.dtype == torch.float32


def test_a_checkpoint_carrying_a_pickled_object_is_refused(tmp_path: Path) -> None:
    store = write(tmp_path, {**trained_state(), "extra": Payload()})
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        read_checkpoint(store, list_checkpoints(store, "t", "job")[0])


def test_a_cuda_rng_state_resumes_on_cpu_by_reseeding() -> None:
    cuda_state = torch.zeros(16, dtype=torch.uint8)  # what a CUDA generator's state looks like
    saved = saved_dropout_rng([cuda_state, cuda_state], "cuda")
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=True)
    generator = torch.Generator()
    assert not restore_dropout_rng(generator, saved, 1, 2, reseed_for(3, 10, 1))
    # Deterministic: the same job, step and rank draw the same numbers.
    expected = torch.Generator().manual_seed(reseed_for(3, 10, 1))
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=expected))


def test_rng_state_restores_exactly_on_the_same_device_and_world_size() -> None:
    source = torch.Generator().manual_seed(5)
    torch.rand(3, generator=source)
    saved = saved_dropout_rng([None, source.get_state()], "cpu")
    generator = torch.Generator()
    assert restore_dropout_rng(generator, saved, 1, 2, reseed=0)
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=source))
    # A different world size (rank 2 of 3 has no saved state): re-seeded, no IndexError.
    assert not restore_dropout_rng(torch.Generator(), saved, 2, 3, reseed=1)
