"""/v1/files: upload (validated JSONL), list, retrieve, content, delete."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from api.deps import IdempotencyKeyHeader, ServicesDep, TenantDep
from api.multipart_upload import read_upload
from api.objects import file_object
from api.schemas import ErrorResponse, FileDeleted, FileObject, ListPage
from orchestrator.errors import InvalidRequest
from orchestrator.files import PURPOSES, FileUpload, check_purpose, commit_file
from orchestrator.idempotency import Idempotency

router = APIRouter(prefix="/v1/files", tags=["files"])
ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 422, 429)
}
UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "JSONL: chat, prompt/completion or text lines "
                        "(one example a line, lines end with \\n). One file part.",
                    },
                    "purpose": {"type": "string", "enum": list(PURPOSES)},
                },
            }
        }
    },
}


@router.post(
    "", response_model=FileObject, responses=ERRORS, openapi_extra={"requestBody": UPLOAD_BODY}
)
async def create_file(
    request: Request,
    services: ServicesDep,
    tenant: TenantDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> FileObject:
    """Upload a training file. It is read as it arrives: a body past
    LORAFLEET_MAX_UPLOAD_BYTES is cut off with 413, each line is checked as it comes, and
    the file is written to the store in parts; it exists (is listed, usable) only once whole
    and valid."""
    settings = services.settings

    def new_upload() -> FileUpload:
        return FileUpload(
            services.objects,
            tenant,
            max_bytes=settings.max_upload_bytes,
            max_lines=settings.max_file_lines,
        )

    read = await read_upload(request, settings.max_upload_bytes, new_upload)
    upload = read.upload
    if upload is None:
        raise InvalidRequest("file: a file part is required", param="file")
    try:
        purpose = read.fields.get("purpose")
        if purpose is None:
            raise InvalidRequest("purpose: a purpose field is required", param="purpose")
        check_purpose(purpose)
        summary = await run_in_threadpool(upload.finish)
    except BaseException:
        await run_in_threadpool(upload.abort)
        raise
    row = upload.row(read.filename, purpose, summary)
    idempotency = (
        Idempotency(
            tenant=tenant,
            endpoint="files.create",
            key=idempotency_key,
            request_hash=upload.request_hash(read.filename, purpose),
            render=lambda created: file_object(created).model_dump(mode="json"),
        )
        if idempotency_key
        else None
    )

    def commit() -> dict[str, object]:
        return commit_file(
            services.store,
            services.objects,
            services.idempotency,
            row,
            idempotency,
            lambda created: file_object(created).model_dump(mode="json"),
        )

    # Storage and database calls block: keep them off the event loop.
    return FileObject.model_validate(await run_in_threadpool(commit))


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
    # A results file (a job's metrics per step) is a CSV; an upload is JSONL.
    media_type = "text/csv" if row.format == "csv" else "application/jsonl"
    return Response(services.objects.get_bytes(row.object_key), media_type=media_type)


@router.delete("/{file_id}", response_model=FileDeleted, responses=ERRORS)
def delete_file(services: ServicesDep, tenant: TenantDep, file_id: str) -> FileDeleted:
    row = services.store.delete_file(tenant, file_id)
    services.objects.delete(row.object_key)
    return FileDeleted(id=row.id, deleted=True)
