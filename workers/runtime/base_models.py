"""Finding a base model's folder: a local path as it is; an s3:// URI downloaded once, cached."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from core.objectstore import ObjectStoreConfig
from core.s3_objectstore import S3ObjectStore

COMPLETE_MARKER = ".lorafleet-complete"


def resolve_base_model(uri: str, cache_dir: Path, store: ObjectStoreConfig) -> Path:
    """Returns a local folder holding the model; s3:// URIs use the store's endpoint and keys."""
    if not uri.startswith("s3://"):
        return Path(uri)
    target = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (target / COMPLETE_MARKER).exists():
        return target
    source = S3ObjectStore(replace(store, url=uri))
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Download into a private folder and rename it in: ranks on one node may race here.
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".download-"))
    try:
        keys = source.list("")
        if not keys:
            raise FileNotFoundError(f"no objects under {uri}")
        for key in keys:
            source.download(key, staging / key)
        (staging / COMPLETE_MARKER).touch()
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / COMPLETE_MARKER).exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
