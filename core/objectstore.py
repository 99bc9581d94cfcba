"""Object storage behind one interface: a local folder (embedded default) or S3 via boto3
(core.s3_objectstore).

Knows nothing of the database. Keys are plain strings ("files/t/file-1.jsonl"); the key
layout itself lives in `core.object_keys`. Writes are whole-object: a reader never sees a
half-written object under its final key.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

CHUNK_BYTES = 1024 * 1024  # an object streamed through a server is read this much at a time

# Called with (outcome, error) on every transport failure of a store call: outcome is
# "retried" or "gave_up". A hook rather than a metric here: core stays free of any metrics
# library (orchestrator/metrics.py registers one that counts them).
ErrorListener = Callable[[str, Exception], None]
_error_listeners: list[ErrorListener] = []


def on_store_error(listener: ErrorListener) -> None:
    """Registers a listener for object-store transport failures (process-wide)."""
    if listener not in _error_listeners:
        _error_listeners.append(listener)


def store_error(outcome: str, error: Exception) -> None:
    """Tells the listeners of one transport failure (core.s3_objectstore calls it)."""
    for listener in list(_error_listeners):
        listener(outcome, error)


class ObjectNotFound(KeyError):
    """The key does not exist in the store."""


class ObjectStoreUnavailable(RuntimeError):
    """The store did not answer (refused, timed out, or a 5xx) through every retry of one
    call: it is away, not wrong. Callers that must outlast an outage (publishing a finished
    job) catch this and try again later; every other error means the request itself failed."""


@dataclass(frozen=True)
class ObjectStoreConfig:
    """Everything needed to open the store; small and picklable so Ray workers get it too."""

    url: str
    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    region: str = "us-east-1"
    # The endpoint as the API's clients reach it (presigned URLs only); None: endpoint_url.
    public_endpoint_url: str | None = None

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")


class ObjectStore(Protocol):
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def download(self, key: str, path: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def presigned_url(self, key: str, expires_s: int = 300) -> str | None: ...
    def iter_chunks(self, key: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]: ...
    def open_writer(self, key: str) -> ObjectWriter: ...


class ObjectWriter(Protocol):
    """An object written in parts as its bytes arrive: `write` any number of times, then
    `commit` (the object appears whole under its key) or `abort` (nothing is left)."""

    def write(self, data: bytes) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


def open_object_store(config: ObjectStoreConfig, retries: int | None = None) -> ObjectStore:
    """`retries`: tries per S3 call before `ObjectStoreUnavailable` (default 8, ~30 s of
    backoff); a caller with its own, longer retry loop asks for fewer."""
    if config.is_s3:
        from core.s3_objectstore import S3ObjectStore  # boto3 only where S3 is used

        return S3ObjectStore(config) if retries is None else S3ObjectStore(config, retries)
    if "://" in config.url:
        raise ValueError(f"object_store: unsupported URL {config.url!r} (a folder or s3://…)")
    return LocalObjectStore(Path(config.url))


class LocalObjectStore:
    """Objects as files under one folder; writes go to a temp file and are renamed in."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"object key escapes the store: {key!r}")
        return path

    def _write_atomically(self, key: str, write: Callable[[Path], object]) -> None:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".partial-")
        os.close(fd)
        try:
            write(Path(tmp))
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomically(key, lambda tmp: tmp.write_bytes(data))

    def put_file(self, key: str, path: Path) -> None:
        self._write_atomically(key, lambda tmp: shutil.copyfile(path, tmp))

    def open_writer(self, key: str) -> ObjectWriter:
        return _LocalWriter(self._path(key))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc

    def download(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        found = []
        for path in self.root.rglob("*"):
            if path.is_file() and not path.name.startswith(".partial-"):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    found.append(key)
        return sorted(found)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def presigned_url(self, key: str, expires_s: int = 300) -> str | None:
        return None  # a local folder has no URL to hand out; callers stream the bytes

    def iter_chunks(self, key: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The object in chunks; opened now, so a missing key raises before the first one."""
        try:
            handle = self._path(key).open("rb")
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc

        def chunks() -> Iterator[bytes]:
            with handle:
                while chunk := handle.read(chunk_bytes):
                    yield chunk

        return chunks()


class _LocalWriter:
    """A temp file beside the final path, renamed in by `commit`."""

    def __init__(self, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        self.final = final
        fd, self.tmp = tempfile.mkstemp(dir=final.parent, prefix=".partial-")
        self.file = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def commit(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)
