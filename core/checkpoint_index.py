"""Where a job's checkpoints are and which are complete: read by the API and by workers.

    runs/{tenant}/{job_id}/checkpoints/step-{n}/…   (manifest.json written last)

Torch-free on purpose: listing checkpoints must not pull tensor code into the API.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from core.layout import checkpoint_prefix
from core.objectstore import ObjectNotFound, ObjectStore

MANIFEST = "manifest.json"
_STEP = re.compile(r"checkpoints/step-(\d+)/")


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    prefix: str
    metrics: dict[str, Any]
    created_at: int


def list_checkpoints(store: ObjectStore, tenant: str, job_id: str) -> list[CheckpointInfo]:
    """Complete checkpoints (manifest present), newest first."""
    root = checkpoint_prefix(tenant, job_id, 0).rsplit("step-", 1)[0]
    found = []
    for key in store.list(root):
        match = _STEP.search(key)
        if not match or not key.endswith("/" + MANIFEST):
            continue
        try:
            manifest = json.loads(store.get_bytes(key))
        except ObjectNotFound:  # pruned meanwhile
            continue
        found.append(
            CheckpointInfo(
                int(match.group(1)),
                key.removesuffix(MANIFEST),
                manifest.get("metrics", {}),
                manifest.get("created_at", 0),
            )
        )
    return sorted(found, key=lambda c: c.step, reverse=True)


def prune_checkpoints(store: ObjectStore, tenant: str, job_id: str, keep_last: int) -> None:
    """Removes all but the newest `keep_last` checkpoints; the manifest goes first, so a
    half-deleted checkpoint is never taken for a complete one."""
    for info in list_checkpoints(store, tenant, job_id)[keep_last:]:
        store.delete(info.prefix + MANIFEST)
        for key in store.list(info.prefix):
            store.delete(key)
