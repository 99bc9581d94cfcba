"""DPO jobs' requests (OpenAI's `method: {"type": "dpo"}`): the preference file is checked on
upload, the job's file must fit its method (a 400 naming the field otherwise), and the job
object shows OpenAI's DPO hyperparameters with their defaults. SQLite only: what is checked
here is the API's, not the database's (the file format column is checked on both elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import GOOD_RECORDS, upload
from tests.api.test_input_errors import assert_error

PAIRS = [
    {
        "input": {"messages": [{"role": "user", "content": f"say {w}"}]},
        "preferred_output": [{"role": "assistant", "content": w.upper()}],
        "non_preferred_output": [{"role": "assistant", "content": w}],
    }
    for w in ("yes", "no")
]


@pytest.fixture()
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'lorafleet.db'}"


def dpo(file_id: str, **hyperparameters: Any) -> dict[str, Any]:
    return {
        "model": "tiny",
        "training_file": file_id,
        "method": {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}},
    }


def test_a_dpo_job_on_preference_pairs_shows_openais_dpo_method(client: TestClient) -> None:
    pairs = upload(client, PAIRS)["id"]
    response = client.post("/v1/fine_tuning/jobs", json=dpo(pairs, beta=0.25, n_epochs=2))
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["method"]["type"] == "dpo" and job["method"]["supervised"] is None
    assert job["method"]["dpo"]["hyperparameters"] == {
        "n_epochs": 2,
        "batch_size": 4,
        "learning_rate_multiplier": 1.0,
        "beta": 0.25,
    }
    defaults = client.post("/v1/fine_tuning/jobs", json=dpo(pairs, beta="auto")).json()
    assert defaults["method"]["dpo"]["hyperparameters"]["beta"] == 0.1  # OpenAI's default
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["method"] == job["method"]
    supervised = upload(client, GOOD_RECORDS)["id"]
    plain = client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": supervised})
    assert plain.json()["method"]["type"] == "supervised"
    assert plain.json()["method"]["dpo"] is None


def test_a_file_that_does_not_fit_the_method_is_a_400_naming_it(client: TestClient) -> None:
    pairs, supervised = upload(client, PAIRS)["id"], upload(client, GOOD_RECORDS)["id"]
    response = client.post("/v1/fine_tuning/jobs", json=dpo(supervised))
    assert_error(response, 400, "training_file", supervised, "preference")
    response = client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": pairs})
    assert_error(response, 400, "training_file", pairs, "dpo")
    response = client.post(
        "/v1/fine_tuning/jobs", json={**dpo(pairs), "validation_file": supervised}
    )
    assert_error(response, 400, "validation_file", supervised, "preference")
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


@pytest.mark.parametrize(
    ("method", "param", "words"),
    [
        (
            {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}},
            "method.dpo.hyperparameters.beta",
            ["greater than 0"],
        ),
        (
            {"type": "dpo", "dpo": {"hyperparameters": {"beta": "x"}}},
            "method.dpo.hyperparameters.beta",
            [],
        ),
        (
            {"type": "dpo", "dpo": {"hyperparameters": {"gamma": 1}}},
            "method.dpo.hyperparameters.gamma",
            [],
        ),
        ({"type": "supervised", "dpo": {}}, "method", ["method.dpo", "supervised"]),
        ({"type": "reinforcement"}, "method.type", []),
    ],
)
def test_bad_dpo_methods_name_the_field(
    client: TestClient, method: dict[str, Any], param: str, words: list[str]
) -> None:
    pairs = upload(client, PAIRS)["id"]
    response = client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": pairs, "method": method}
    )
    assert_error(response, 400, param, *words)


def test_a_bad_preference_line_is_refused_on_upload(client: TestClient) -> None:
    bad = {**PAIRS[0], "preferred_output": [{"role": "user", "content": "x"}]}
    body = "\n".join(json.dumps(r) for r in (PAIRS[0], bad)).encode()
    response = client.post(
        "/v1/files", files={"file": ("p.jsonl", body)}, data={"purpose": "fine-tune"}
    )
    assert_error(response, 400, "file", "line 2", "preferred_output[0].role")


def test_the_cli_creates_a_dpo_job_with_dpo_beta(live_server: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from api.cli import app

    pairs, plain = tmp_path / "pairs.jsonl", tmp_path / "plain.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in PAIRS))
    plain.write_text("\n".join(json.dumps(r) for r in GOOD_RECORDS))

    def lorafleet(*args: str) -> Any:
        return CliRunner().invoke(app, list(args), env={"LORAFLEET_URL": live_server})

    create = ("jobs", "create", "--model", "tiny", "--dpo-beta", "0.2", "--json")
    made = lorafleet(*create, "--training-file", str(pairs))
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["method"]["dpo"]["hyperparameters"]["beta"] == 0.2
    refused = lorafleet(*create, "--training-file", str(plain))
    assert refused.exit_code == 2 and "training_file" in refused.output
