"""The official `openai` SDK, unchanged but for base_url and api_key, against a real server."""

from __future__ import annotations

import io
import json

import openai
import pytest
from openai import OpenAI

from orchestrator.settings import Settings
from tests.api.conftest import GOOD_RECORDS


@pytest.fixture()
def sdk(live_server: str) -> OpenAI:
    return OpenAI(base_url=f"{live_server}/v1", api_key="unused-until-keys-exist", max_retries=0)


def training_file(sdk: OpenAI) -> str:
    content = "\n".join(json.dumps(r) for r in GOOD_RECORDS).encode()
    created = sdk.files.create(file=("train.jsonl", io.BytesIO(content)), purpose="fine-tune")
    assert created.id.startswith("file-") and created.bytes == len(content)
    assert sdk.files.retrieve(created.id).filename == "train.jsonl"
    assert sdk.files.content(created.id).read() == content
    return created.id


def test_files_and_jobs_through_the_sdk(sdk: OpenAI) -> None:
    file_id = training_file(sdk)
    jobs = [
        sdk.fine_tuning.jobs.create(
            model="tiny",
            training_file=file_id,
            suffix=f"run{i}",
            seed=i,
            metadata={"batch": "sdk", "index": str(i)},
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
            extra_body={"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        )
        for i in range(5)
    ]
    assert all(j.status == "validating_files" and j.hyperparameters.n_epochs == 2 for j in jobs)
    assert jobs[0].model_extra is not None and jobs[0].model_extra["lora"]["r"] == 4

    page = sdk.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in page.data] == [jobs[4].id, jobs[3].id] and page.has_more
    assert [j.id for j in sdk.fine_tuning.jobs.list(limit=2)] == [j.id for j in reversed(jobs)]
    filtered = sdk.fine_tuning.jobs.list(metadata={"index": "3"})
    assert [j.id for j in filtered.data] == [jobs[3].id]

    retrieved = sdk.fine_tuning.jobs.retrieve(jobs[0].id)
    assert retrieved.id == jobs[0].id and retrieved.training_file == file_id
    events = sdk.fine_tuning.jobs.list_events(jobs[0].id, limit=10)
    assert [e.message for e in events.data] == [f"Created fine-tuning job: {jobs[0].id}"]
    assert sdk.fine_tuning.jobs.checkpoints.list(jobs[0].id).data == []

    cancelled = sdk.fine_tuning.jobs.cancel(jobs[1].id)
    assert cancelled.status == "cancelled"
    assert {m.id for m in sdk.models.list()} == {"tiny"}
    assert sdk.files.delete(file_id).deleted


def test_bad_input_surfaces_as_the_sdks_errors_with_the_field(sdk: OpenAI) -> None:
    file_id = training_file(sdk)
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.fine_tuning.jobs.create(
            model="tiny", training_file=file_id, extra_body={"lora": {"r": 0}}
        )
    assert bad.value.param == "lora.r" and "greater than or equal to 1" in bad.value.message
    with pytest.raises(openai.BadRequestError) as unknown:
        sdk.fine_tuning.jobs.create(model="gpt-x", training_file=file_id)
    assert unknown.value.param == "model"
    with pytest.raises(openai.BadRequestError) as bad_line:
        sdk.files.create(file=("bad.jsonl", io.BytesIO(b'{"prompt": 1}')), purpose="fine-tune")
    assert bad_line.value.param == "file" and "line 1" in bad_line.value.message
    with pytest.raises(openai.NotFoundError):
        sdk.fine_tuning.jobs.retrieve("ftjob-missing")


def test_pause_and_resume_through_the_sdk_answer_409_naming_the_state(
    sdk: OpenAI, settings: Settings
) -> None:
    from orchestrator.db import make_engine
    from orchestrator.store import JobStore

    file_id = training_file(sdk)
    job = sdk.fine_tuning.jobs.create(model="tiny", training_file=file_id)
    with pytest.raises(openai.ConflictError) as early:
        sdk.fine_tuning.jobs.pause(job.id)
    assert f"job {job.id} is validating_files; only a running job can be paused" in (
        early.value.message
    )
    with pytest.raises(openai.ConflictError) as not_paused:
        sdk.fine_tuning.jobs.resume(job.id)
    assert "is validating_files; only a paused job can be resumed" in not_paused.value.message
    # No scheduler here: the job is moved to running as a scheduler's claim would.
    store = JobStore(make_engine(settings.database_url))
    store.queue(job.id, "Files validated; job queued")
    store.claim(job.id, 0, "host-test", "Fine-tuning job started")
    assert sdk.fine_tuning.jobs.pause(job.id).status == "pausing"
    assert sdk.fine_tuning.jobs.pause(job.id).status == "pausing"  # asked again: unchanged
    said = [e.message for e in sdk.fine_tuning.jobs.list_events(job.id, limit=5).data]
    assert said[0] == "Pause requested by tenant default"  # open mode: no key to name
    assert sdk.fine_tuning.jobs.cancel(job.id).status == "cancelling"  # cancel while pausing
