"""API keys and tenants: once a key exists every request needs one, and no tenant can read,
cancel, download or list another tenant's objects (another tenant's id is a 404)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from orchestrator.api_keys import ApiKeys
from tests.api.conftest import GOOD_RECORDS, upload


def keys(client: TestClient) -> ApiKeys:
    return client.app.state.services.keys  # type: ignore[attr-defined,no-any-return]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_without_keys_the_server_is_open_and_with_one_it_is_closed(client: TestClient) -> None:
    assert client.get("/v1/fine_tuning/jobs").status_code == 200
    _, key = keys(client).create("acme")
    for headers in ({}, bearer("lf-wrong")):
        response = client.get("/v1/fine_tuning/jobs", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/fine_tuning/jobs", headers=bearer(key)).status_code == 200
    keys(client).revoke(key)
    assert client.get("/v1/fine_tuning/jobs", headers=bearer(key)).status_code == 401


def test_keys_are_stored_hashed(client: TestClient) -> None:
    row, key = keys(client).create("acme")
    assert key.startswith("tml-") and len(key) > 40
    assert key not in (row.key_hash, row.key_prefix) and row.key_prefix == key[:8]


def test_no_endpoint_lets_one_tenant_reach_anothers_objects(client: TestClient) -> None:
    _, mine = keys(client).create("acme")
    _, theirs = keys(client).create("globex")
    client.headers.update(bearer(mine))
    file_id = upload(client, GOOD_RECORDS)["id"]
    job = client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id}
    ).json()

    other = TestClient(client.app, headers=bearer(theirs))
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", f"/v1/files/{file_id}", {}),
        ("GET", f"/v1/files/{file_id}/content", {}),
        ("DELETE", f"/v1/files/{file_id}", {}),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}", {}),
        ("POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel", {}),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}/events", {}),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}/events?stream=true", {}),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", {}),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}/adapter", {}),
        ("GET", f"/v1/fine_tuning/jobs?after={job['id']}", {}),
        ("POST", "/v1/fine_tuning/jobs", {"json": {"model": "tiny", "training_file": file_id}}),
    ]
    for method, path, extra in requests:
        response = other.request(method, path, **extra)
        assert response.status_code in (400, 404), (method, path, response.status_code)
        assert file_id in response.text or job["id"] in response.text
    assert other.get("/v1/files").json()["data"] == []
    assert other.get("/v1/fine_tuning/jobs").json()["data"] == []
    # Nothing of acme's changed.
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "validating_files"
    assert client.get(f"/v1/files/{file_id}").status_code == 200


@pytest.mark.parametrize("tenant", ["", "a b", "x" * 129, "../etc"])
def test_tenant_names_are_checked(client: TestClient, tenant: str) -> None:
    with pytest.raises(ValueError, match="tenant"):
        keys(client).create(tenant)
