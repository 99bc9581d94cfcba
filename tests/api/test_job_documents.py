"""GET job and the job list write their bodies from plain documents, without building the
pydantic models; the bytes must be exactly the models' own (`model_dump_json`)."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from api.objects import job_document, job_json, job_object, page_json
from api.schemas import FineTuningJob, ListPage
from core.job_settings import (
    JobSettings,
    LoraSettings,
    ResourceSettings,
    StartFrom,
    TrainingSettings,
)
from orchestrator.store import JobStore
from orchestrator.store.job_reads import JobFields
from orchestrator.tables import JobRow
from tests.api.conftest import GOOD_RECORDS, upload
from tests.conftest import job_row

numbers = st.integers(min_value=1, max_value=1024) | st.floats(min_value=1, max_value=1024)
floats = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def job_settings(draw: st.DrawFn) -> JobSettings:
    """Any typed settings a job row can hold (core/job_settings.py)."""
    text = st.text(max_size=8)
    return JobSettings(
        lora=LoraSettings(
            r=draw(st.integers(1, 1024)),
            alpha=draw(numbers),
            dropout=draw(floats),
            target_modules=draw(st.just("all-linear") | st.tuples(text) | st.tuples(text, text)),
        ),
        training=TrainingSettings(
            n_epochs=draw(st.integers(min_value=1, max_value=100)),
            batch_size=draw(st.integers(min_value=1, max_value=1024)),
            # Stored as given: an int multiplier is written 2.0 by the model.
            learning_rate_multiplier=draw(numbers),
            learning_rate=draw(floats),
            max_seq_len=draw(st.integers(-(2**70), 2**70)),
            precision=draw(st.sampled_from([None, "bf16", "fp32"])),
        ),
        resources=ResourceSettings(
            num_workers=draw(st.integers(1, 64)), use_gpu=draw(st.none() | st.booleans())
        ),
        packing=draw(st.booleans()),
        from_checkpoint=draw(
            st.none() | st.builds(StartFrom, checkpoint=text, adapter_prefix=text)
        ),
    )


@st.composite
def job_rows(draw: st.DrawFn) -> Any:
    failed = draw(st.booleans())
    return job_row(
        settings=draw(job_settings()),
        user_metadata=draw(st.none() | st.dictionaries(st.text(), st.text(), max_size=3)),
        suffix=draw(st.none() | st.text(max_size=8)),
        priority=draw(st.none() | st.integers(-1000, 1000)),
        max_runtime=draw(st.none() | st.integers(1, 86400)),
        status="failed" if failed else "queued",
        error_code="oom" if failed else None,
        error_message=draw(st.none() | st.text()) if failed else None,
        finished_at=draw(st.none() | st.integers(0, 2**40)),
        trained_tokens=draw(st.none() | st.integers(0, 2**40)),
        fine_tuned_model=draw(st.none() | st.text(max_size=16)),
    )


def fields_of(row: JobRow) -> JobFields:
    """The job as the API's reads return it (JSON columns as the text SQLAlchemy stores)."""
    columns = {c.key: getattr(row, c.key) for c in JobRow.__mapper__.column_attrs}
    values: dict[str, Any] = {}
    name: str
    for name in JobFields._fields:
        column: str
        column = name.removesuffix("_json")
        value = columns[column]
        if isinstance(value, JobSettings):
            value = value.to_stored()
        values[name] = json.dumps(value) if name != column else value
    return JobFields(**values)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=job_rows(), more=st.lists(job_rows(), max_size=3), has_more=st.booleans())
def test_a_job_document_serializes_to_the_models_bytes(
    row: Any, more: list[Any], has_more: bool
) -> None:
    assert job_json(fields_of(row)) == job_object(row).model_dump_json().encode()
    rows = [row, *more]
    page = ListPage[FineTuningJob](data=[job_object(r) for r in rows], has_more=has_more)
    body = page_json([job_json(fields_of(r)) for r in rows], has_more)
    assert body == page.model_dump_json().encode()


def test_a_document_has_every_field_of_the_model_in_its_order() -> None:
    row = job_row(settings={"training": {"n_epochs": 1, "batch_size": 1}})
    assert list(job_document(row)) == list(FineTuningJob.model_fields)


def test_get_and_list_answer_with_what_the_model_writes(client: TestClient) -> None:
    file_id = upload(client, GOOD_RECORDS)["id"]  # type: ignore[arg-type]
    created = []
    for metadata in ({"team": "ä 😀"}, None):
        response = client.post(
            "/v1/fine_tuning/jobs",
            json={"model": "tiny", "training_file": file_id, "metadata": metadata,
                  "hyperparameters": {"learning_rate_multiplier": 2, "n_epochs": 1}},
        )  # fmt: skip
        assert response.status_code == 200, response.text
        created.append(response.json()["id"])
    store: JobStore = client.app.state.services.store  # type: ignore[attr-defined]
    for job_id in created:
        got = client.get(f"/v1/fine_tuning/jobs/{job_id}")
        assert got.status_code == 200 and got.headers["content-type"] == "application/json"
        # The same bytes as the create path, which serializes the model built from a JobRow.
        assert got.content == job_object(store.job(job_id)).model_dump_json().encode()
        assert json.loads(got.content)["hyperparameters"]["learning_rate_multiplier"] == 2.0
    listed = client.get("/v1/fine_tuning/jobs", params={"limit": 1})
    page = ListPage[FineTuningJob](data=[job_object(store.job(created[1]))], has_more=True)
    assert listed.content == page.model_dump_json().encode()
    # A body is kept by (id, version), and every write raises the version: a change shows
    # at once, through the API or straight into the database.
    cancelled = client.post(f"/v1/fine_tuning/jobs/{created[0]}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    got = client.get(f"/v1/fine_tuning/jobs/{created[0]}")
    assert got.json()["status"] == "cancelled" == store.job(created[0]).status
    assert got.content == job_object(store.job(created[0])).model_dump_json().encode()
    listed = client.get("/v1/fine_tuning/jobs").json()["data"]
    assert [job["status"] for job in listed] == [store.job(created[1]).status, "cancelled"]
    with store.engine.begin() as connection:
        connection.execute(
            text("UPDATE jobs SET status = 'failed', error_code = 'oom' WHERE id = :id"),
            {"id": created[1]},
        )
    listed = client.get("/v1/fine_tuning/jobs").json()["data"]
    assert [(job["status"], job["error"] and job["error"]["code"]) for job in listed] == [
        ("failed", "oom"),
        ("cancelled", None),
    ]
    assert client.get(f"/v1/fine_tuning/jobs/{created[1]}").json()["status"] == "failed"
    listed = client.get("/v1/fine_tuning/jobs").json()["data"]
    assert [j["status"] for j in listed] == [store.job(i).status for i in reversed(created)]
    assert listed[1]["status"] == "cancelled"
    missing = client.get("/v1/fine_tuning/jobs/ftjob-nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_the_openapi_document_still_describes_the_job_responses(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    get = paths["/v1/fine_tuning/jobs/{job_id}"]["get"]["responses"]["200"]
    listed = paths["/v1/fine_tuning/jobs"]["get"]["responses"]["200"]
    assert get["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/FineTuningJob"
    }
    assert "FineTuningJob" in json.dumps(listed["content"]["application/json"]["schema"])
