"""Limits: too many lines → 413, too many unfinished jobs for a tenant → 429; nothing stored."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from api.app import create_app
from orchestrator.settings import Settings
from tests.api.conftest import GOOD_RECORDS, upload


def test_line_and_job_quotas(tmp_path: Path, tiny_base: Path, database_url: str) -> None:
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        base_models={"tiny": str(tiny_base)},
        max_file_lines=3,
        max_active_jobs_per_tenant=2,
    )
    with TestClient(create_app(settings)) as client:
        too_long = b'{"text": "a"}\n' * 4
        response = client.post(
            "/v1/files", files={"file": ("d.jsonl", too_long)}, data={"purpose": "fine-tune"}
        )
        assert response.status_code == 413
        assert (
            response.json()["error"]["param"] == "file"
            and "3-line" in response.json()["error"]["message"]
        )
        assert client.get("/v1/files").json()["data"] == []

        file_id = upload(client, GOOD_RECORDS)["id"]
        body = {"model": "tiny", "training_file": file_id}
        first = client.post("/v1/fine_tuning/jobs", json=body).json()
        client.post("/v1/fine_tuning/jobs", json=body)
        refused = client.post("/v1/fine_tuning/jobs", json=body)
        assert (
            refused.status_code == 429 and "2 unfinished jobs" in refused.json()["error"]["message"]
        )
        assert len(client.get("/v1/fine_tuning/jobs").json()["data"]) == 2
        client.post(f"/v1/fine_tuning/jobs/{first['id']}/cancel")  # a finished job frees a place
        assert client.post("/v1/fine_tuning/jobs", json=body).status_code == 200
