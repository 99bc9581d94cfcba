"""`integrations` (OpenAI's shape) at job creation: a wandb integration is stored and echoed
in the job object; where the `wandb` package is not installed the job is refused (400, param
`integrations`) and nothing is stored; a malformed one names its field."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import GOOD_RECORDS, upload
from tests.api.test_input_errors import assert_error

WANDB = {"type": "wandb", "wandb": {"project": "sweeps", "name": "lr-1e-3", "tags": ["lr"]}}


def create(client: TestClient, **fields: Any) -> Any:
    file_id = upload(client, GOOD_RECORDS)["id"]
    return client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id, **fields}
    )


def test_a_wandb_integration_is_echoed_in_the_job_object(client: TestClient) -> None:
    pytest.importorskip("wandb")  # the `wandb` extra (in the dev extra)
    created = create(client, integrations=[WANDB])
    assert created.status_code == 200, created.text
    expected = [
        {
            "type": "wandb",
            "wandb": {"project": "sweeps", "name": "lr-1e-3", "entity": None, "tags": ["lr"]},
        }
    ]
    assert created.json()["integrations"] == expected
    job = client.get(f"/v1/fine_tuning/jobs/{created.json()['id']}").json()
    assert job["integrations"] == expected
    assert create(client).json()["integrations"] == []


def test_without_wandb_installed_the_job_is_refused_naming_integrations(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules is how Python marks a module as not importable: find_spec says
    # None and `import wandb` raises ImportError, as on a server without the extra.
    monkeypatch.setitem(sys.modules, "wandb", None)
    response = create(client, integrations=[WANDB])
    assert_error(response, 400, "integrations", "wandb is not installed", "lorafleet[wandb]")
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


@pytest.mark.parametrize(
    ("integration", "param", "words"),
    [
        ({"type": "slack", "wandb": {"project": "p"}}, "integrations.0.type", ("wandb",)),
        ({"type": "wandb", "wandb": {}}, "integrations.0.wandb.project", ("required",)),
        (
            {"type": "wandb", "wandb": {"project": "p", "tags": "one"}},
            "integrations.0.wandb.tags",
            ("list",),
        ),
    ],
)
def test_a_malformed_integration_names_its_field(
    client: TestClient, integration: dict[str, Any], param: str, words: tuple[str, ...]
) -> None:
    assert_error(create(client, integrations=[integration]), 400, param, *words)
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
