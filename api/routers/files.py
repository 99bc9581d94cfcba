"""/v1/files: upload (validated JSONL), list, retrieve, content, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from api.deps import IdempotencyKeyHeader, ServicesDep, TenantDep
from api.objects import file_object
from api.schemas import ErrorResponse, FileDeleted, FileObject, ListPage
from orchestrator.errors import PayloadTooLarge
from orchestrator.files import upload_file
from orchestrator.idempotency import Idempotency, request_hash
from orchestrator.tables import FileRow

router = APIRouter(prefix="/v1/files", tags=["files"])
ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 422)
}
CHUNK = 1 << 20


async def _read_bounded(upload: UploadFile, limit: int) -> bytes:
    """Reads at most limit + 1 bytes, so an oversized upload is refused without holding it."""
    chunks, size = [], 0
    while chunk := await upload.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"file is larger than the {limit}-byte limit", param="file")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("", response_model=FileObject, responses=ERRORS)
async def create_file(
    services: ServicesDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File(description="JSONL: chat, prompt/completion or text lines")],
    purpose: Annotated[str, Form()],
    idempotency_key: IdempotencyKeyHeader = None,
) -> FileObject:
    data = await _read_bounded(file, services.settings.max_upload_bytes)
    filename = file.filename or "upload.jsonl"

    idempotency = (
        Idempotency(
            tenant=tenant,
            endpoint="files.create",
            key=idempotency_key,
            request_hash=request_hash(filename, purpose, data),
            render=lambda row: file_object(row).model_dump(mode="json"),
        )
        if idempotency_key
        else None
    )

    def upload() -> FileObject:
        def store_file() -> FileRow:
            return upload_file(
                services.store,
                services.objects,
                tenant=tenant,
                filename=filename,
                purpose=purpose,
                data=data,
                max_bytes=services.settings.max_upload_bytes,
                max_lines=services.settings.max_file_lines,
                idempotency=idempotency,
            )

        if idempotency is None:
            return file_object(store_file())
        return FileObject.model_validate(services.idempotency.create_once(idempotency, store_file))

    # Storage and database calls block: keep them off the event loop.
    return await run_in_threadpool(upload)


@router.get("", response_model=ListPage[FileObject])
def list_files(
    services: ServicesDep, tenant: TenantDep, purpose: str | None = None
) -> ListPage[FileObject]:
    rows = services.store.list_files(tenant, purpose)
    return ListPage[FileObject](data=[file_object(r) for r in rows])


@router.get("/{file_id}", response_model=FileObject, responses=ERRORS)
def retrieve_file(services: ServicesDep, tenant: TenantDep, file_id: str) -> FileObject:
    return file_object(services.store.get_file(tenant, file_id))


@router.get("/{file_id}/content", responses=ERRORS)
def file_content(services: ServicesDep, tenant: TenantDep, file_id: str) -> Response:
    row = services.store.get_file(tenant, file_id)
    return Response(services.objects.get_bytes(row.object_key), media_type="application/jsonl")


@router.delete("/{file_id}", response_model=FileDeleted, responses=ERRORS)
def delete_file(services: ServicesDep, tenant: TenantDep, file_id: str) -> FileDeleted:
    row = services.store.delete_file(tenant, file_id)
    services.objects.delete(row.object_key)
    return FileDeleted(id=row.id, deleted=True)
