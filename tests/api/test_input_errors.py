"""Bad input: a 4xx in OpenAI's error envelope whose message and `param` name the field,
and nothing stored."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import MAX_UPLOAD, upload

GOOD = [{"prompt": "1+1=", "completion": "2"}]


def assert_error(response: Any, status: int, param: str, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"]


def test_a_bad_jsonl_line_is_named_and_nothing_is_stored(client: TestClient) -> None:
    body = b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n'
    response = client.post(
        "/v1/files", files={"file": ("d.jsonl", body)}, data={"purpose": "fine-tune"}
    )
    assert_error(response, 400, "file", "line 2", "completion", "missing")
    assert client.get("/v1/files").json()["data"] == []


def test_wrong_purpose(client: TestClient) -> None:
    response = client.post(
        "/v1/files", files={"file": ("d.jsonl", b'{"text": "x"}')}, data={"purpose": "batch"}
    )
    assert_error(response, 400, "purpose", "fine-tune")
    assert client.get("/v1/files").json()["data"] == []


def test_oversized_upload(client: TestClient) -> None:
    body = b'{"text": "' + b"x" * MAX_UPLOAD + b'"}'
    response = client.post(
        "/v1/files", files={"file": ("d.jsonl", body)}, data={"purpose": "fine-tune"}
    )
    assert_error(response, 413, "file", str(MAX_UPLOAD))
    assert client.get("/v1/files").json()["data"] == []


def test_missing_multipart_field(client: TestClient) -> None:
    response = client.post("/v1/files", data={"purpose": "fine-tune"})
    assert_error(response, 400, "file", "required")


def create(client: TestClient, **fields: Any) -> Any:
    return client.post("/v1/fine_tuning/jobs", json=fields)


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"model": "gpt-17"}, "model", ("gpt-17", "tiny")),
        ({"training_file": "file-nope"}, "training_file", ("file-nope", "does not exist")),
        ({"validation_file": "file-nope"}, "validation_file", ("file-nope",)),
        ({"lora": {"r": 0}}, "lora.r", ("greater than or equal to 1",)),
        ({"lora": {"r": -3}}, "lora.r", ("greater than",)),
        ({"lora": {"dropout": 1.5}}, "lora.dropout", ("less than 1",)),
        ({"lora": {"target_modules": ["q_proj;rm"]}}, "lora.target_modules", ("pattern",)),
        ({"lora": {"rank": 8}}, "lora.rank", ("Extra inputs",)),
        ({"hyperparameters": {"n_epochs": -1}}, "hyperparameters.n_epochs", ("greater than",)),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
            "method.supervised.hyperparameters.n_epochs",
            ("greater than",),
        ),
        ({"hyperparameters": {"batch_size": "big"}}, "hyperparameters.batch_size", ("integer",)),
        ({"training": {"learning_rate": 0}}, "training.learning_rate", ("greater than 0",)),
        ({"resources": {"num_workers": 0}}, "resources.num_workers", ("greater than",)),
        ({"training": {"warmup_ratio": 1.0}}, "training.warmup_ratio", ("less than 1",)),
        ({"training": {"warmup_ratio": -0.1}}, "training.warmup_ratio", ("greater than",)),
        (
            {"training": {"warmup_steps": 5, "warmup_ratio": 0.1}},
            "training.warmup_ratio",
            ("warmup_steps or warmup_ratio, not both",),
        ),
        ({"training": {"lr_scheduler": "step"}}, "training.lr_scheduler", ("linear", "cosine")),
        ({"training": {"n_checkpoints": 0}}, "training.n_checkpoints", ("greater than",)),
        ({"training": {"n_evals": -1}}, "training.n_evals", ("greater than",)),
        (
            {"training": {"early_stopping_patience": 2}},
            "training.early_stopping_patience",
            ("needs a validation_file",),
        ),
        ({"suffix": "no spaces"}, "suffix", ("pattern",)),
        ({"seed": -1}, "seed", ("greater than",)),
        ({"surprise": True}, "surprise", ("Extra inputs",)),
    ],
)
def test_bad_job_requests_name_the_field(
    client: TestClient, fields: dict[str, Any], param: str, words: tuple[str, ...]
) -> None:
    file_id = upload(client, GOOD)["id"]
    body = {"model": "tiny", "training_file": file_id, **fields}
    assert_error(create(client, **body), 400, param, *words)
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_missing_required_fields(client: TestClient) -> None:
    assert_error(create(client, model="tiny"), 400, "training_file", "required")


def test_unknown_ids_are_404(client: TestClient) -> None:
    for path in ("", "/events", "/adapter"):
        response = client.get(f"/v1/fine_tuning/jobs/ftjob-nope{path}")
        assert response.status_code == 404
        assert "ftjob-nope" in response.json()["error"]["message"]
    assert client.post("/v1/fine_tuning/jobs/ftjob-nope/cancel").status_code == 404
    assert client.get("/v1/files/file-nope").status_code == 404


def test_page_size_is_bounded(client: TestClient) -> None:
    assert_error(client.get("/v1/fine_tuning/jobs?limit=1000"), 400, "limit", "less than")


def test_a_good_job_is_created_with_its_settings_resolved(client: TestClient) -> None:
    file_id = upload(client, GOOD)["id"]
    response = create(
        client,
        model="tiny",
        training_file=file_id,
        suffix="calc",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        metadata={"team": "search"},
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] == "validating_files"
    assert job["hyperparameters"] == {
        "n_epochs": 2,
        "batch_size": 4,
        "learning_rate_multiplier": 1.0,
    }
    assert job["lora"]["r"] == 4 and job["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert job["metadata"] == {"team": "search"}
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json() == job


def test_schedule_settings_are_stored_and_shown_with_their_defaults(client: TestClient) -> None:
    file_id = upload(client, GOOD)["id"]
    training = {"lr_scheduler": "cosine", "warmup_ratio": 0.1, "train_on_inputs": True}
    job = create(client, model="tiny", training_file=file_id, training=training).json()
    assert {k: job["training"][k] for k in training} == training
    assert (job["training"]["warmup_steps"], job["training"]["n_checkpoints"]) == (0, None)
    plain = create(client, model="tiny", training_file=file_id).json()["training"]
    assert (plain["lr_scheduler"], plain["warmup_ratio"], plain["train_on_inputs"]) == (
        "linear",
        None,
        False,
    )


def test_cancelling_before_it_runs_and_then_again(client: TestClient) -> None:
    file_id = upload(client, GOOD)["id"]
    job = create(client, model="tiny", training_file=file_id).json()
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert cancelled.json()["status"] == "cancelled"
    again = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and "cancelled" in again.json()["error"]["message"]
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "cancelled"
    no_adapter = client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter")
    assert no_adapter.status_code == 409


def test_from_checkpoint_must_name_a_checkpoint_of_ones_own_job(client: TestClient) -> None:
    file_id = upload(client, GOOD)["id"]
    source = create(client, model="tiny", training_file=file_id, lora={"r": 4}).json()
    checkpoint = f"ftckpt-{source['id'].removeprefix('ftjob-')}-10"
    forked = create(client, model="tiny", training_file=file_id, from_checkpoint=checkpoint)
    assert forked.status_code == 200, forked.text
    assert forked.json()["from_checkpoint"] == checkpoint
    assert forked.json()["lora"]["r"] == 4  # inherited from the checkpoint's job
    mismatch = create(
        client, model="tiny", training_file=file_id, from_checkpoint=checkpoint, lora={"r": 8}
    )
    assert_error(mismatch, 400, "lora", "must match")
    for bogus in ("ftckpt-nope-1", f"ftckpt-{source['id'].removeprefix('ftjob-')}-x", "x"):
        bad = create(client, model="tiny", training_file=file_id, from_checkpoint=bogus)
        assert_error(bad, 400, "from_checkpoint", bogus)
