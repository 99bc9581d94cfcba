"""Merged weights in the store: which scale a request names, what a merge task is given and
gives back, the listing of a finished merge, and removing a job's stored outputs.

Torch-free on purpose: the API reads these (a replica imports no training stack); the merge
itself is `workers.lora.merge`, run by `workers.runtime.merge_task` as a Ray task.

    merged/{tenant}/{job_id}/{checkpoint}/scale-{scale}/model-0000k-of-0000n.safetensors …
                                                       /config.json, tokenizer files …
                                                       /manifest.json   (written last)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from core.object_keys import (
    MANIFEST,
    adapter_prefix,
    adapters_root,
    checkpoint_prefix,
    checkpoints_root,
    merged_prefix,
    merged_root,
)
from core.objectstore import ObjectNotFound, ObjectStore, ObjectStoreConfig
from core.publish import Manifest

# Beyond ±4 the change is larger than anything trained (1 is the adapter as trained, 0 the
# base; negative values subtract it): a typo, not a request.
MAX_ABS_SCALE = 4.0
FINAL = "final"  # the job's published adapter, as opposed to a periodic checkpoint


def canonical_scale(value: float) -> str:
    """The scale as one text per value (six significant digits: 0.5, 1, 0.333333), used in
    keys and merged as that value; ValueError, naming the bound, when it is not allowed."""
    if not math.isfinite(value):
        raise ValueError(f"scale must be a finite number, not {value}")
    if abs(value) > MAX_ABS_SCALE:
        raise ValueError(f"scale must be between -{MAX_ABS_SCALE:g} and {MAX_ABS_SCALE:g}")
    text = f"{value:.6g}"
    return "0" if float(text) == 0 else text


def checkpoint_name(step: int | None) -> str:
    """ "final" for a job's published adapter, "step-{n}" for one of its checkpoints."""
    return FINAL if step is None else f"step-{step}"


def merge_source_prefix(tenant: str, job_id: str, attempt: int, checkpoint: str) -> str:
    """Where the PEFT folder a merge starts from is (adapter_config.json + safetensors)."""
    if checkpoint == FINAL:
        return adapter_prefix(tenant, job_id, attempt)
    return checkpoint_prefix(tenant, job_id, attempt, int(checkpoint.removeprefix("step-")))


@dataclass(frozen=True)
class MergeRequest:
    """What a merge task needs (small and picklable: Ray ships it to the task)."""

    merge_id: str
    tenant: str
    job_id: str
    checkpoint: str
    scale: str
    adapter_prefix: str
    base_model_uri: str
    object_store: ObjectStoreConfig
    model_cache_dir: Path

    @property
    def prefix(self) -> str:
        return merged_prefix(self.tenant, self.job_id, self.checkpoint, self.scale)


@dataclass(frozen=True)
class MergeOutcome:
    merge_id: str
    job_id: str
    bytes: int = 0  # what the merged files take in the store (manifest included)
    error: str | None = None
    peak_tensor_bytes: int = 0


def read_merged(
    store: ObjectStore, tenant: str, job_id: str, checkpoint: str, scale: str
) -> Manifest | None:
    """The finished merge's manifest (name -> sha256, size), or None while there is none."""
    try:
        raw = store.get_bytes(merged_prefix(tenant, job_id, checkpoint, scale) + MANIFEST)
    except ObjectNotFound:
        return None
    return Manifest.from_json(raw)


def delete_job_outputs(store: ObjectStore, tenant: str, job_id: str) -> int:
    """Removes every adapter, checkpoint and merged weight of a job from the store (each
    prefix's manifests first, so nothing half-deleted reads as whole); returns how many
    objects went."""
    removed = 0
    roots = (merged_root(tenant, job_id), adapters_root(tenant, job_id))
    for root in (*roots, checkpoints_root(tenant, job_id)):
        keys = store.list(root)
        for key in sorted(keys, key=lambda k: not k.endswith("/" + MANIFEST)):
            store.delete(key)
            removed += 1
    return removed
