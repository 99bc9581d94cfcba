"""The resumable event stream and the progress fields, on the API in-process (no Ray)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from rich.console import Console

from api.app import create_app
from api.client import _server_sent_events
from api.watch import finish_text, progress_fields, watch_jobs
from orchestrator.settings import Settings


@pytest.fixture()
def client(tmp_path: Path, tiny_base: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path / "state", base_models={"tiny": str(tiny_base)})
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def ended_job(client: TestClient) -> str:
    """A job with a few events that has ended (cancelled while queued: no Ray needed)."""
    body = json.dumps({"prompt": "1+1=", "completion": "2"}).encode()
    file_id = client.post(
        "/v1/files", files={"file": ("d.jsonl", body)}, data={"purpose": "fine-tune"}
    ).json()["id"]
    job_id = client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id}
    ).json()["id"]
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200
    return str(job_id)


def stream(client: TestClient, job_id: str, **headers: str) -> list[tuple[str | None, str]]:
    url = f"/v1/fine_tuning/jobs/{job_id}/events?stream=true"
    with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200
        return list(_server_sent_events(response.iter_lines()))


def test_each_streamed_event_carries_its_id_and_a_reconnect_resumes_after_it(
    client: TestClient,
) -> None:
    job_id = ended_job(client)
    everything = stream(client, job_id)
    assert everything[-1] == (None, "[DONE]")
    events = everything[:-1]
    assert len(events) >= 2
    assert all(event_id == json.loads(data)["id"] for event_id, data in events)

    resumed = stream(client, job_id, **{"Last-Event-ID": str(events[0][0])})
    assert resumed == everything[1:]
    by_query = client.get(
        f"/v1/fine_tuning/jobs/{job_id}/events",
        params={"stream": "true", "after": events[-1][0]},
    )
    assert list(_server_sent_events(iter(by_query.text.splitlines()))) == [(None, "[DONE]")]


def test_progress_shows_an_unknown_total_until_training_starts() -> None:
    assert "total" not in progress_fields({"type": "message", "data": {"status": "queued"}})
    started = progress_fields({"type": "message", "data": {"total_steps": 12, "world_size": 2}})
    assert started["total"] == 12 and started["steps"] == "0/12 steps"
    step = progress_fields(
        {
            "type": "metrics",
            "data": {"step": 3, "total_steps": 12, "train_loss": 1.5, "tokens_per_second": 90},
        }
    )
    assert step["completed"] == 3 and step["steps"] == "3/12 steps"
    assert step["loss"] == "loss 1.500" and step["speed"] == "90 tok/s"


class _OneStepClient:
    """A stream of one training step, and a job whose server estimates its end."""

    def __init__(self, estimated_finish: int) -> None:
        self.job = {"id": "ftjob-a", "status": "running", "estimated_finish": estimated_finish}

    def follow(self, job_id: str) -> Iterator[dict[str, Any]]:
        yield {"type": "message", "data": {"status": "running", "total_steps": 4}}
        yield {"type": "metrics", "data": {"step": 1, "total_steps": 4, "train_loss": 2.0}}

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self.job


def test_a_bar_shows_the_jobs_estimated_finish_as_a_time_of_day() -> None:
    today = datetime.now().replace(hour=14, minute=32, second=5, microsecond=0)
    assert finish_text(None) == ""
    assert finish_text(int(today.timestamp())) == "ends ~14:32:05"
    other_day = today + timedelta(days=2)
    assert finish_text(int(other_day.timestamp())) == f"ends ~{other_day:%Y-%m-%d} 14:32"
    output = io.StringIO()
    client: Any = _OneStepClient(int(datetime.now().replace(microsecond=0).timestamp()) + 90)
    watch_jobs(client, {"a": "ftjob-a"}, Console(file=output, width=200))
    assert finish_text(client.job["estimated_finish"]) in output.getvalue()
