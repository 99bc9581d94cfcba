"""Which queued jobs train together: packs of jobs that share a base model and a run shape.

Pure: the scheduler hands in the queue, and launches what comes back. A pack waits a short
window for company (like a bus), unless it is full already.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PackKey:
    """Jobs can share a run only if they agree on all of these."""

    model: str
    num_workers: int
    use_gpu: bool | None
    precision: str | None = None  # None: by device (bf16 on a GPU, fp32 on CPU)


def pack_key(job: Any) -> PackKey:
    resources = job.settings["resources"]
    precision = job.settings.get("training", {}).get("precision")
    return PackKey(job.model, resources["num_workers"], resources["use_gpu"], precision)


def wants_packing(job: Any) -> bool:
    return bool(job.settings.get("packing", True))


def plan_packs(
    queued: list[Any], *, max_pack_size: int, free_runs: int, now: float, window_s: float
) -> list[list[Any]]:
    """Groups the queue (oldest first) into packs, and returns those ready to launch.

    A pack is ready when it is full or its oldest job has waited `window_s`. At most
    `free_runs` packs are returned, oldest first.
    """
    packs: list[list[Any]] = []
    open_packs: dict[PackKey, list[Any]] = {}
    for job in queued:
        key = pack_key(job)
        pack = open_packs.get(key)
        if wants_packing(job) and pack is not None and len(pack) < max_pack_size:
            pack.append(job)
            continue
        pack = [job]
        packs.append(pack)
        if wants_packing(job):
            open_packs[key] = pack
    ready = [
        p
        for p in packs
        if len(p) >= max_pack_size or not wants_packing(p[0]) or now - p[0].created_at >= window_s
    ]
    return ready[: max(0, free_runs)]
