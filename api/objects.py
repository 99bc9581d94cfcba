"""Database rows → OpenAI-shaped response objects."""

from __future__ import annotations

from fastapi.responses import Response

from api.schemas import (
    FileObject,
    FineTuningJob,
    FineTuningJobEvent,
    JobError,
    JobHyperparameters,
    JobMethod,
)
from orchestrator.models import FileRow, JobEventRow, JobRow
from orchestrator.store import JobFields


def file_object(row: FileRow) -> FileObject:
    return FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=row.created_at,
        filename=row.filename,
        purpose=row.purpose,
    )


def job_object(row: JobRow | JobFields) -> FineTuningJob:
    """From a JobRow, or from the same job read as plain columns (the list and GET path)."""
    hyperparameters = JobHyperparameters(**row.settings["hyperparameters"])
    error = (
        JobError(code=row.error_code, message=row.error_message or "", param=row.error_param)
        if row.error_code
        else None
    )
    return FineTuningJob(
        id=row.id,
        created_at=row.created_at,
        finished_at=row.finished_at,
        model=row.model,
        fine_tuned_model=row.fine_tuned_model,
        organization_id=row.tenant,
        status=row.status,
        hyperparameters=hyperparameters,
        method=JobMethod(supervised={"hyperparameters": hyperparameters}),
        training_file=row.training_file,
        validation_file=row.validation_file,
        result_files=[],
        trained_tokens=row.trained_tokens,
        error=error,
        seed=row.seed,
        suffix=row.suffix,
        user_provided_suffix=row.suffix,
        metadata=row.user_metadata,
        lora=row.settings["lora"],
        training=row.settings["training"],
        resources=row.settings["resources"],
        from_checkpoint=(row.settings.get("from_checkpoint") or {}).get("checkpoint"),
        priority=row.priority or 0,
        max_runtime=row.max_runtime,
    )


def event_object(row: JobEventRow) -> FineTuningJobEvent:
    return FineTuningJobEvent(
        id=row.id,
        created_at=row.created_at,
        level=row.level,
        message=row.message,
        type=row.type,
        data=row.data,
    )


def json_response(body: bytes) -> Response:
    """A body serialized once, by the route, from a model it built and validated itself:
    FastAPI's response_model pass would validate and serialize the same object again."""
    return Response(body, media_type="application/json")
