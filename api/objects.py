"""Database rows → OpenAI-shaped response objects."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from fastapi.responses import Response
from pydantic import TypeAdapter

from api.schemas import (
    FileObject,
    FineTuningJob,
    FineTuningJobEvent,
)
from core.job_settings import TrainingSettings
from orchestrator.store import JobFields
from orchestrator.tables import FileRow, JobEventRow, JobRow


def file_object(row: FileRow) -> FileObject:
    return FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=row.created_at,
        filename=row.filename,
        purpose=row.purpose,
    )


def _method(training: TrainingSettings, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's `method`: the hyperparameters under the method's own key (DPO's with beta)."""
    if training.preference is None:
        supervised = {"hyperparameters": hyperparameters}
        return {"type": "supervised", "supervised": supervised, "dpo": None}
    dpo = {**hyperparameters, "beta": training.preference.beta}
    return {"type": "dpo", "supervised": None, "dpo": {"hyperparameters": dpo}}


def job_document(row: JobRow | JobFields) -> dict[str, Any]:
    """The job as its response document: FineTuningJob's fields in order, each already of
    its field's type, so serializing it as is gives the model's own bytes (the GET and list
    path skips building the model; tests/api/test_job_documents.py checks the equality).
    From a JobRow, or from the same job read as plain columns (JobFields)."""
    settings = row.settings
    hyperparameters = {
        "n_epochs": settings.training.n_epochs,
        "batch_size": settings.training.batch_size,
        "learning_rate_multiplier": settings.training.learning_rate_multiplier,
    }
    error = (
        {"code": row.error_code, "message": row.error_message or "", "param": row.error_param}
        if row.error_code
        else None
    )
    return {
        "object": "fine_tuning.job",
        "id": row.id,
        "created_at": row.created_at,
        "finished_at": row.finished_at,
        # Only while it runs: a job that stopped keeps its last estimate in the row.
        "estimated_finish": row.estimated_finish if row.status == "running" else None,
        "model": row.model,
        "fine_tuned_model": row.fine_tuned_model,
        "organization_id": row.tenant,
        "status": row.status,
        "hyperparameters": hyperparameters,
        "method": _method(settings.training, hyperparameters),
        "training_file": row.training_file,
        "validation_file": row.validation_file,
        "result_files": row.result_files or [],
        "trained_tokens": row.trained_tokens,
        "error": error,
        "seed": row.seed,
        "suffix": row.suffix,
        "user_provided_suffix": row.suffix,
        "metadata": row.user_metadata,
        "integrations": [i.model_dump(mode="json") for i in settings.integrations],
        "lora": settings.lora.model_dump(mode="json"),
        "training": settings.training.model_dump(mode="json"),
        "resources": settings.resources.model_dump(mode="json"),
        "from_checkpoint": start.checkpoint if (start := settings.from_checkpoint) else None,
        "priority": row.priority or 0,
        "max_runtime": row.max_runtime,
        "model_deleted_at": row.model_deleted_at,
    }


def job_object(row: JobRow | JobFields) -> FineTuningJob:
    return FineTuningJob.model_validate(job_document(row))


# Serializes plain documents with the same pydantic-core serializer and defaults
# (e.g. NaN as null) as a model's model_dump_json.
_DOCUMENT = TypeAdapter(Any)
# Bodies of jobs read recently (~1.5 KB each): clients poll the same jobs over and over.
JOB_JSON_KEPT = 4096


class JobBodies:
    """Response bodies of jobs, kept by (id, version).

    A trigger raises a job's version with every write to its row (migration 0008), so a body
    kept for a pair is that job's body as long as the database still reads that pair: never
    stale. A list page reads only its jobs' pairs; decoding a row's JSON and writing its body
    is what is saved, and for a page, reading the rows themselves."""

    def __init__(self, kept: int = JOB_JSON_KEPT) -> None:
        self.kept = kept
        self._bodies: dict[tuple[str, int], bytes] = {}
        self._lock = threading.Lock()  # reads run in several threads

    def get(self, key: tuple[str, int]) -> bytes | None:
        return self._bodies.get(key)

    def of(self, row: JobFields) -> bytes:
        key = (row.id, row.version)
        body = self._bodies.get(key)
        if body is None:
            body = _DOCUMENT.dump_json(job_document(row))
            with self._lock:
                if len(self._bodies) >= self.kept:  # the oldest goes first
                    del self._bodies[next(iter(self._bodies))]
                self._bodies[key] = body
        return body


BODIES = JobBodies()


def job_json(row: JobFields) -> bytes:
    """GET job's body: `job_object(row).model_dump_json()`, without building the model."""
    return BODIES.of(row)


def versioned_page_json(
    keys: list[tuple[str, int]], has_more: bool, read_job: Callable[[str], JobFields]
) -> bytes:
    """The job list's body from the page's (id, version) pairs: kept bodies as they are,
    `read_job(id)` for the others (a row read after the pair may be newer, never older)."""
    return page_json([BODIES.get(key) or job_json(read_job(key[0])) for key in keys], has_more)


def page_json(bodies: list[bytes], has_more: bool) -> bytes:
    """The job list's body: ListPage[FineTuningJob]'s JSON (compact, fields in order) around
    its jobs' bodies as job_json writes them."""
    return b'{"object":"list","data":[%b],"has_more":%b}' % (
        b",".join(bodies),
        b"true" if has_more else b"false",
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
