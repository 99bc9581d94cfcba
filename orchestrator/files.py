"""Training files: checked line by line on upload, stored whole, or not stored at all."""

from __future__ import annotations

from core.examples import DatasetError, summarize_jsonl
from core.object_keys import file_key
from core.objectstore import ObjectStore
from orchestrator.errors import InvalidRequest, PayloadTooLarge
from orchestrator.idempotency import Idempotency
from orchestrator.store import JobStore, new_id, now
from orchestrator.tables import FileRow

PURPOSES = ("fine-tune",)


def upload_file(
    store: JobStore,
    objects: ObjectStore,
    *,
    tenant: str,
    filename: str,
    purpose: str,
    data: bytes,
    max_bytes: int,
    max_lines: int,
    idempotency: Idempotency | None = None,
) -> FileRow:
    if purpose not in PURPOSES:
        raise InvalidRequest(
            f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}", param="purpose"
        )
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"file is larger than the {max_bytes}-byte limit", param="file")
    if sum(1 for line in data.splitlines() if line.strip()) > max_lines:
        raise PayloadTooLarge(f"file has more than the {max_lines}-line limit", param="file")
    try:
        summary = summarize_jsonl(data)
    except DatasetError as exc:
        raise InvalidRequest(str(exc), param="file", code="invalid_file") from exc
    file_id = new_id("file")
    key = file_key(tenant, file_id)
    objects.put_bytes(key, data)
    return store.add_file(
        FileRow(
            id=file_id,
            tenant=tenant,
            filename=filename,
            purpose=purpose,
            bytes=len(data),
            created_at=now(),
            object_key=key,
            format=summary.format,
            examples=summary.examples,
        ),
        idempotency,
    )
