"""Idempotency-Key on job and file creation: a retry returns the first response, a reused
key with another body is refused, and concurrent duplicates create exactly one object."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
from fastapi.testclient import TestClient

from tests.api.conftest import GOOD_RECORDS, upload


def test_a_retried_job_creation_returns_the_first_job(client: TestClient) -> None:
    file_id = upload(client, GOOD_RECORDS)["id"]
    body = {"model": "tiny", "training_file": file_id, "seed": 5}
    first = client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "k1"})
    again = client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    assert len(client.get("/v1/fine_tuning/jobs").json()["data"]) == 1

    changed = client.post(
        "/v1/fine_tuning/jobs", json={**body, "seed": 6}, headers={"Idempotency-Key": "k1"}
    )
    assert changed.status_code == 422
    assert changed.json()["error"]["param"] == "Idempotency-Key"
    other_key = client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "k2"})
    assert other_key.json()["id"] != first.json()["id"]


def test_a_failed_first_request_leaves_the_key_free(client: TestClient) -> None:
    body = {"model": "nope", "training_file": "file-x"}
    assert (
        client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "k"}).status_code
        == 400
    )
    file_id = upload(client, GOOD_RECORDS)["id"]
    fixed = {"model": "tiny", "training_file": file_id}
    assert (
        client.post(
            "/v1/fine_tuning/jobs", json=fixed, headers={"Idempotency-Key": "k"}
        ).status_code
        == 200
    )


def test_a_retried_upload_stores_one_file(client: TestClient) -> None:
    content = "\n".join(json.dumps(r) for r in GOOD_RECORDS).encode()
    responses = [
        client.post(
            "/v1/files",
            files={"file": ("d.jsonl", content)},
            data={"purpose": "fine-tune"},
            headers={"Idempotency-Key": "upload-1"},
        )
        for _ in range(2)
    ]
    assert responses[0].json() == responses[1].json()
    assert len(client.get("/v1/files").json()["data"]) == 1


def test_twenty_concurrent_identical_requests_create_exactly_one_job(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=60) as client:
        file_id = upload(client, GOOD_RECORDS)["id"]
        body = {"model": "tiny", "training_file": file_id}

        def create(_: int) -> httpx.Response:
            with httpx.Client(base_url=live_server, timeout=60) as own:
                return own.post(
                    "/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "same"}
                )

        with ThreadPoolExecutor(max_workers=20) as pool:
            responses = list(pool.map(create, range(20)))
        assert [r.status_code for r in responses] == [200] * 20
        assert len({r.json()["id"] for r in responses}) == 1
        assert len(client.get("/v1/fine_tuning/jobs").json()["data"]) == 1
