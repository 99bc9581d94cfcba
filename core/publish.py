"""Publishing an adapter folder to the object store, and verifying what was published.

The manifest (sha256 and size of every file) is written last: its presence means every
file it names was stored whole, and a reader checks the checksums before trusting them.
Each attempt of a job publishes under its own prefix (core/object_keys.py): a late publish by a
stale attempt can never replace what the current attempt published.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from core.object_keys import ADAPTER_FILES, ARCHIVE, MANIFEST, adapter_key
from core.objectstore import ObjectNotFound, ObjectStore


class PublishError(RuntimeError):
    """An adapter in the store is missing a file or does not match its manifest."""


@dataclass(frozen=True)
class Manifest:
    files: dict[str, dict[str, int | str]]  # name -> {"sha256": hex, "size": bytes}

    def to_json(self) -> bytes:
        return json.dumps({"files": self.files}, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        return cls(files=json.loads(raw)["files"])


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish_adapter(
    store: ObjectStore, tenant: str, job_id: str, attempt: int, folder: Path
) -> Manifest:
    files: dict[str, dict[str, int | str]] = {}
    for name in ADAPTER_FILES:
        data = (folder / name).read_bytes()
        files[name] = {"sha256": sha256_hex(data), "size": len(data)}
        store.put_file(adapter_key(tenant, job_id, attempt, name), folder / name)
    manifest = Manifest(files=files)
    store.put_bytes(adapter_key(tenant, job_id, attempt, MANIFEST), manifest.to_json())
    return manifest


def verify_adapter(store: ObjectStore, tenant: str, job_id: str, attempt: int) -> Manifest:
    """Reads the manifest and checks every file against it; raises PublishError if not whole."""
    try:
        raw = store.get_bytes(adapter_key(tenant, job_id, attempt, MANIFEST))
        manifest = Manifest.from_json(raw)
    except ObjectNotFound as exc:
        raise PublishError(f"adapter of {job_id} has no manifest") from exc
    if set(manifest.files) != set(ADAPTER_FILES):
        raise PublishError(f"manifest of {job_id} lists {sorted(manifest.files)}")
    for name, expected in manifest.files.items():
        try:
            data = store.get_bytes(adapter_key(tenant, job_id, attempt, name))
        except ObjectNotFound as exc:
            raise PublishError(f"{name} of {job_id} is missing") from exc
        if len(data) != expected["size"] or sha256_hex(data) != expected["sha256"]:
            raise PublishError(f"{name} of {job_id} does not match its manifest")
    return manifest


def build_adapter_archive(
    store: ObjectStore, tenant: str, job_id: str, attempt: int, mtime: int = 0
) -> bytes:
    """A .tar.gz of the PEFT folder and its manifest, as users download it."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name in (*ADAPTER_FILES, MANIFEST):
            data = store.get_bytes(adapter_key(tenant, job_id, attempt, name))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = mtime
            tar.addfile(info, io.BytesIO(data))
    return archive.getvalue()


def store_adapter_archive(
    store: ObjectStore, tenant: str, job_id: str, attempt: int, mtime: int = 0
) -> None:
    store.put_bytes(
        adapter_key(tenant, job_id, attempt, ARCHIVE),
        build_adapter_archive(store, tenant, job_id, attempt, mtime),
    )
