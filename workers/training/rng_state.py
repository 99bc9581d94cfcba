"""Each rank's dropout RNG in a checkpoint, portable across devices and world sizes.

A generator's state is device-specific (a CUDA state is 16 bytes, a CPU one 5056) and a
checkpoint holds one per rank. Restored on the same device type and world size, training
continues bit for bit; otherwise the stream is re-seeded deterministically from the job's
seed, the step and the rank, so a requeued job still trains (and reproducibly so).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def saved_dropout_rng(states: Sequence[torch.Tensor | None], device_type: str) -> dict[str, Any]:
    """What a checkpoint keeps: each rank's state (gathered in rank order) and where from."""
    return {"device_type": device_type, "world_size": len(states), "states": list(states)}


def restore_dropout_rng(
    generator: torch.Generator, saved: Any, rank: int, world_size: int, reseed: int
) -> bool:
    """Puts this rank's stream back; True when exactly, False when re-seeded with `reseed`."""
    if isinstance(saved, list):  # written before the device type was kept: a CPU run's
        saved = saved_dropout_rng(saved, "cpu")
    same = (
        saved is not None
        and saved["device_type"] == generator.device.type
        and saved["world_size"] == world_size
        and saved["states"][rank] is not None
    )
    if same:
        generator.set_state(saved["states"][rank])
        return True
    generator.manual_seed(reseed)
    return False


def reseed_for(seed: int, step: int, rank: int) -> int:
    """A seed that depends only on the job, where it resumes and the rank."""
    return (seed * 1_000_003 + step * 7_919 + rank) % (2**63)
