"""The resumable event stream and the progress fields, on the API in-process (no Ray)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.client import _server_sent_events
from api.watch import progress_fields
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
