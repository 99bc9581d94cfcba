"""Which examples go into which step on which rank: deterministic from the seed (pure)."""

from __future__ import annotations

import math
import random


def micro_batch_per_rank(batch_size: int, world_size: int) -> int:
    """The global batch is split across ranks; every rank gets at least one example."""
    return max(1, math.ceil(batch_size / world_size))


def plan_batches(n_examples: int, global_batch: int, n_epochs: int, seed: int) -> list[list[int]]:
    """Global batches of example indices, reshuffled every epoch.

    The last batch of an epoch is topped up from the start of that epoch's order so every
    rank always has a full micro-batch (ranks must take the same number of steps).
    """
    if n_examples <= 0 or global_batch <= 0 or n_epochs <= 0:
        raise ValueError("plan_batches needs positive examples, batch size and epochs")
    batches = []
    for epoch in range(n_epochs):
        order = list(range(n_examples))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for start in range(0, n_examples, global_batch):
            batch = order[start : start + global_batch]
            while len(batch) < global_batch:
                batch.extend(order[: global_batch - len(batch)])
            batches.append(batch)
    return batches


def rank_share(batch: list[int], rank: int, world_size: int) -> list[int]:
    return batch[rank::world_size]
