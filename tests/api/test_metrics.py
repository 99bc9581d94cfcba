"""/metrics: parsed with prometheus_client's own parser; job gauges, API latency by route
template (no job id in any label), the optional token, and a scheduler's own endpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from api.server_process import free_port
from orchestrator.settings import Settings
from tests.api.conftest import GOOD_RECORDS, upload
from tests.conftest import wait_for_condition


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_jobs_by_status(client: TestClient) -> None:
    file_id = upload(client, GOOD_RECORDS)["id"]
    for _ in range(2):
        client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id})
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id})
    client.post(f"/v1/fine_tuning/jobs/{job.json()['id']}/cancel")
    found = samples(client.get("/metrics").text)
    assert found[("lorafleet_jobs", (("status", "validating_files"),))] == 2
    assert found[("lorafleet_jobs", (("status", "cancelled"),))] == 1
    assert found[("lorafleet_jobs", (("status", "succeeded"),))] == 0
    assert found[("lorafleet_queue_depth", ())] == 0
    assert found[("lorafleet_slots_in_use", ())] == 0


def test_api_latency_is_labelled_by_route_template_never_by_job_id(client: TestClient) -> None:
    file_id = upload(client, GOOD_RECORDS)["id"]
    job_id = client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id}
    ).json()["id"]
    route = "/v1/fine_tuning/jobs/{job_id}"

    def count() -> float:
        key = (
            "lorafleet_api_request_seconds_count",
            (("method", "GET"), ("route", route)),
        )
        return samples(client.get("/metrics").text).get(key, 0.0)

    before = count()
    for _ in range(3):
        assert client.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 200
    assert count() == before + 3
    text = client.get("/metrics").text
    assert job_id not in text and file_id not in text


def test_a_metrics_token_is_required_when_set(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"metrics_token": "s3cret"}))) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = c.get("/metrics", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert samples(ok.text)[("lorafleet_queue_depth", ())] == 0


def test_a_scheduler_serves_its_own_metrics(settings: Settings, tmp_path: Path) -> None:
    """The endpoint runs on its own thread: it answers even while the scheduler's loop has
    no Ray cluster to reach (none is given here; what it trains is tested elsewhere)."""
    port = free_port()
    env = {
        **os.environ,
        "LORAFLEET_DATA_DIR": str(settings.data_dir),
        "LORAFLEET_METRICS_TOKEN": "tok",
        "RAY_ADDRESS": f"127.0.0.1:{free_port()}",
    }
    with open(tmp_path / "scheduler.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "scheduler", "--metrics-port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/metrics"
    try:

        def up() -> bool:
            assert process.poll() is None, (tmp_path / "scheduler.log").read_text()
            try:
                return httpx.get(url, timeout=2).status_code == 401
            except httpx.TransportError:
                return False

        wait_for_condition(up, timeout=120, what="the scheduler's /metrics")
        found = samples(httpx.get(url, headers={"Authorization": "Bearer tok"}).text)
        assert found[("lorafleet_jobs", (("status", "queued"),))] == 0
        assert found[("lorafleet_trained_steps_total", ())] == 0
        assert ("lorafleet_step_seconds_count", ()) in found
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
