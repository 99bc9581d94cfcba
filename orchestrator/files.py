"""Training files: checked line by line as their bytes arrive, written to the store in
parts, and counted (a row) only once whole; a refused or losing upload leaves nothing."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from core.examples import DatasetError, DatasetSummary, JsonlCheck, TooManyLines
from core.object_keys import file_key
from core.objectstore import ObjectStore
from orchestrator.errors import InvalidRequest, PayloadTooLarge
from orchestrator.idempotency import Idempotency, IdempotencyKeys, request_hash
from orchestrator.store import JobStore, new_id, now
from orchestrator.tables import FileRow

PURPOSES = ("fine-tune",)


def check_purpose(purpose: str) -> None:
    if purpose not in PURPOSES:
        raise InvalidRequest(
            f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}", param="purpose"
        )


class FileUpload:
    """One upload in flight: `feed` its bytes as they come (each call checks the size
    limit, then the lines, then writes), then `finish`; `abort` on any failure. Memory is
    the line checker's partial line and the store writer's part, not the file."""

    def __init__(
        self, objects: ObjectStore, tenant: str, *, max_bytes: int, max_lines: int
    ) -> None:
        self.objects = objects
        self.tenant = tenant
        self.max_bytes = max_bytes
        self.file_id = new_id("file")
        self.key = file_key(tenant, self.file_id)
        self.size = 0
        self.digest = hashlib.sha256()
        self.check = JsonlCheck(max_lines=max_lines)
        self.writer = objects.open_writer(self.key)

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise PayloadTooLarge(f"file is larger than the {self.max_bytes}-byte limit", "file")
        try:
            self.check.feed(data)
        except TooManyLines as exc:
            raise PayloadTooLarge(str(exc), param="file") from exc
        self.digest.update(data)
        self.writer.write(data)

    def finish(self) -> DatasetSummary:
        """The whole file's check, then its object committed to the store."""
        try:
            summary = self.check.finish()
        except TooManyLines as exc:
            raise PayloadTooLarge(str(exc), param="file") from exc
        except DatasetError as exc:
            raise InvalidRequest(str(exc), param="file", code="invalid_file") from exc
        self.writer.commit()
        return summary

    def abort(self) -> None:
        self.writer.abort()

    def request_hash(self, filename: str, purpose: str) -> str:
        """For Idempotency-Key: the same file sent again hashes the same."""
        return request_hash(filename, purpose, self.digest.digest())

    def row(self, filename: str, purpose: str, summary: DatasetSummary) -> FileRow:
        return FileRow(
            id=self.file_id,
            tenant=self.tenant,
            filename=filename,
            purpose=purpose,
            bytes=self.size,
            created_at=now(),
            object_key=self.key,
            format=summary.format,
            examples=summary.examples,
        )


def commit_file(
    store: JobStore,
    objects: ObjectStore,
    keys: IdempotencyKeys,
    row: FileRow,
    idempotency: Idempotency | None,
    render: Callable[[FileRow], dict[str, object]],
) -> dict[str, object]:
    """Adds the file's row (with its Idempotency-Key record, when given) and answers it. Its
    object, already stored, is deleted again when no row names it: the insert failed, or an
    earlier or concurrent request with the same key answered instead."""
    try:
        if idempotency is None:
            answer = render(store.add_file(row))
        else:
            answer = keys.create_once(idempotency, lambda: store.add_file(row, idempotency))
    except BaseException:
        objects.delete(row.object_key)
        raise
    if answer.get("id") != row.id:
        objects.delete(row.object_key)
    return answer
