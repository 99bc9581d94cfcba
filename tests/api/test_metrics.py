"""/metrics: Prometheus exposition of jobs by status."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.api.conftest import GOOD_RECORDS, upload


def test_metrics_count_jobs_by_status(client: TestClient) -> None:
    file_id = upload(client, GOOD_RECORDS)["id"]
    for _ in range(2):
        client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id})
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id})
    client.post(f"/v1/fine_tuning/jobs/{job.json()['id']}/cancel")
    text = client.get("/metrics").text
    assert 'lorafleet_jobs{status="validating_files"} 2.0' in text
    assert 'lorafleet_jobs{status="cancelled"} 1.0' in text
    assert 'lorafleet_jobs{status="succeeded"} 0.0' in text
