"""A merge as the scheduler runs it (a Ray task beside the pack hosts, where the base is):
the adapter from the store, the base from its folder (or its cached copy), each merged shard
sent to the store as soon as it is written and deleted locally, the manifest written last.

A merge cut short leaves no manifest, so it is never listed; run again, it writes the same
keys over.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from core.merged_files import MergeOutcome, MergeRequest
from core.object_keys import ADAPTER_FILES, MANIFEST
from core.objectstore import open_object_store
from core.publish import Manifest
from workers.lora.merge import merge_adapter
from workers.runtime.base_models import resolve_base_model

HASH_CHUNK = 1024 * 1024


def merge_to_store(request: MergeRequest) -> MergeOutcome:
    """Runs one merge; a failure comes back as the outcome's `error`, never raised."""
    try:
        return _merge(request)
    except Exception as exc:  # reported on the merge's row; the task itself must not die
        return MergeOutcome(request.merge_id, request.job_id, error=f"{type(exc).__name__}: {exc}")


def _merge(request: MergeRequest) -> MergeOutcome:
    store = open_object_store(request.object_store)
    base = resolve_base_model(request.base_model_uri, request.model_cache_dir, request.object_store)
    files: dict[str, dict[str, int | str]] = {}

    def upload(name: str, path: Path) -> None:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
        files[name] = {"sha256": digest.hexdigest(), "size": path.stat().st_size}
        store.put_file(request.prefix + name, path)
        path.unlink()  # the disk, too, holds one merged shard at a time

    with tempfile.TemporaryDirectory(prefix="lorafleet-merge-") as work:
        adapter = Path(work) / "adapter"
        for name in ADAPTER_FILES:
            store.download(request.adapter_prefix + name, adapter / name)
        stats = merge_adapter(
            base, adapter, Path(work) / "merged", float(request.scale), on_file=upload
        )
    manifest = Manifest(files=files).to_json()
    store.put_bytes(request.prefix + MANIFEST, manifest)
    stored = sum(int(f["size"]) for f in files.values()) + len(manifest)
    return MergeOutcome(
        request.merge_id, request.job_id, bytes=stored, peak_tensor_bytes=stats.peak_tensor_bytes
    )
