"""Per-job checkpoints in the object store: a loadable PEFT adapter plus the training state.

    runs/{tenant}/{job_id}/checkpoints/step-{n}/adapter_config.json
                                               /adapter_model.safetensors
                                               /training_state.pt   (optimizer, schedule,
                                                                     step, tokens, RNG;
                                                                     plain data only)
                                               /manifest.json       (written last)

A checkpoint without a manifest (a writer that died half-way) is never used. A job resumes
from its newest complete checkpoint whatever pack it trains in, so each can resume alone.
The training state is read with `weights_only=True` (tensors, lists, dicts, numbers,
strings): whoever can write to the bucket must not run code on every worker. It is loaded
onto the CPU, so a state written on `cuda:0` resumes on any rank, GPU or not.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch

from core.checkpoint_index import MANIFEST, CheckpointInfo
from core.object_keys import checkpoint_prefix
from core.objectstore import ObjectStore
from core.publish import sha256_hex

STATE = "training_state.pt"


class UnsafeCheckpointError(ValueError):
    """A checkpoint's training state holds objects other than tensors and plain data."""


def write_checkpoint(
    store: ObjectStore,
    tenant: str,
    job_id: str,
    step: int,
    adapter_folder: Path,
    state: dict[str, Any],
    metrics: dict[str, Any],
    created_at: int,
    *,
    attempt: int,
) -> CheckpointInfo:
    prefix = checkpoint_prefix(tenant, job_id, attempt, step)
    files: dict[str, dict[str, Any]] = {}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    blobs = {STATE: buffer.getvalue()}
    for path in sorted(adapter_folder.iterdir()):
        blobs[path.name] = path.read_bytes()
    for name, data in blobs.items():
        store.put_bytes(prefix + name, data)
        files[name] = {"sha256": sha256_hex(data), "size": len(data)}
    manifest = {"step": step, "files": files, "metrics": metrics, "created_at": created_at}
    store.put_bytes(prefix + MANIFEST, json.dumps(manifest, sort_keys=True).encode())
    return CheckpointInfo(step, prefix, metrics, created_at, attempt)


def read_checkpoint(
    store: ObjectStore, info: CheckpointInfo
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter tensors and the training state, checked against the manifest."""
    from safetensors.torch import load

    manifest = json.loads(store.get_bytes(info.prefix + MANIFEST))
    blobs = {}
    for name, expected in manifest["files"].items():
        data = store.get_bytes(info.prefix + name)
        if sha256_hex(data) != expected["sha256"]:
            raise ValueError(f"checkpoint {info.prefix}{name} does not match its manifest")
        blobs[name] = data
    try:
        state = torch.load(io.BytesIO(blobs[STATE]), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"checkpoint {info.prefix}{STATE} holds objects other than tensors and plain data;"
            f" refusing to load it: {str(exc).splitlines()[0]}"
        ) from exc
    return load(blobs["adapter_model.safetensors"]), state
