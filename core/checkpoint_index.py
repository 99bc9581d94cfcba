"""Where a job's checkpoints are and which are complete: read by the API and by workers.

    runs/{tenant}/{job_id}/attempt-{n}/checkpoints/step-{s}/…   (manifest.json written last)

An attempt resumes from the newest checkpoint by (attempt, step) among attempts up to its
own, so a stale attempt's later checkpoints are never picked up by an earlier one, and a
stale attempt never sees (or prunes) a newer attempt's checkpoints.

Torch-free on purpose: listing checkpoints must not pull tensor code into the API.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from core.object_keys import CHECKPOINT_KEY, checkpoints_root
from core.objectstore import ObjectNotFound, ObjectStore

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    prefix: str
    metrics: dict[str, Any]
    created_at: int
    attempt: int = 0


def list_checkpoints(
    store: ObjectStore, tenant: str, job_id: str, up_to_attempt: int | None = None
) -> list[CheckpointInfo]:
    """Complete checkpoints (manifest present) of attempts ≤ `up_to_attempt` (all when
    None), newest first by (attempt, step)."""
    found = []
    for key in store.list(checkpoints_root(tenant, job_id)):
        match = CHECKPOINT_KEY.search(key)
        if not match or not key.endswith("/" + MANIFEST):
            continue
        attempt, step = int(match.group(1)), int(match.group(2))
        if up_to_attempt is not None and attempt > up_to_attempt:
            continue
        try:
            manifest = json.loads(store.get_bytes(key))
        except ObjectNotFound:  # pruned meanwhile
            continue
        found.append(
            CheckpointInfo(
                step,
                key.removesuffix(MANIFEST),
                manifest.get("metrics", {}),
                manifest.get("created_at", 0),
                attempt,
            )
        )
    return sorted(found, key=lambda c: (c.attempt, c.step), reverse=True)


def prune_checkpoints(
    store: ObjectStore,
    tenant: str,
    job_id: str,
    attempt: int,
    keep_last: int,
    keep_step: int | None = None,
) -> None:
    """Removes all but the newest `keep_last` checkpoints of attempts ≤ `attempt` (never a
    newer attempt's), and never one at step `keep_step` (early stopping's best); the
    manifest goes first, so a half-deleted checkpoint is never taken for a complete one."""
    for info in list_checkpoints(store, tenant, job_id, up_to_attempt=attempt)[keep_last:]:
        if info.step == keep_step:
            continue
        store.delete(info.prefix + MANIFEST)
        for key in store.list(info.prefix):
            store.delete(key)
