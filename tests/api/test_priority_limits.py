"""Who may use which priorities: LORAFLEET_TENANT_MAX_PRIORITY per tenant ("*": the rest),
0 by default. A request above its tenant's highest is refused with 400 naming `priority`
(not clamped: the client learns what it may ask for, and what is stored is what it sent)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from orchestrator.settings import Settings
from tests.api.conftest import GOOD_RECORDS, upload
from tests.api.test_tenants import bearer, keys


@pytest.fixture()
def limited(tmp_path: Path, tiny_base: Path, database_url: str) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path / "state",
        database_url=database_url,
        base_models={"tiny": str(tiny_base)},
        tenant_max_priority={"acme": 10, "*": 2},
    )
    with TestClient(create_app(settings)) as client:
        yield client


def create(client: TestClient, key: str, priority: int) -> tuple[int, dict]:  # type: ignore[type-arg]
    client.headers.update(bearer(key))
    file_id = upload(client, GOOD_RECORDS)["id"]
    body = {"model": "tiny", "training_file": file_id, "priority": priority}
    response = client.post("/v1/fine_tuning/jobs", json=body)
    return response.status_code, response.json()


def test_each_tenant_may_use_priorities_up_to_its_own_highest(limited: TestClient) -> None:
    _, acme = keys(limited).create("acme")
    _, globex = keys(limited).create("globex")
    status, job = create(limited, acme, 10)
    assert status == 200 and job["priority"] == 10
    status, job = create(limited, globex, 2)  # not named: the "*" entry
    assert status == 200 and job["priority"] == 2
    status, body = create(limited, globex, 3)
    assert status == 400
    error = body["error"]
    assert error["param"] == "priority" and "3" in error["message"] and "2" in error["message"]
    status, _ = create(limited, acme, -5)  # lower than the default: always allowed
    assert status == 200


def test_by_default_no_tenant_may_ask_above_0(client: TestClient) -> None:
    file_id = upload(client, GOOD_RECORDS)["id"]
    response = client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id, "priority": 1}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "priority"
    ok = client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id, "priority": 0}
    )
    assert ok.status_code == 200, ok.text
