"""GET …/checkpoints of a job that stopped early: the final entry is the published adapter at
its best step, with OpenAI's metric names from the job's last metrics event, and that step's
periodic checkpoint is not listed twice; the results file of its events is a CSV that
GET /v1/files/{id}/content returns."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from fastapi.testclient import TestClient

from core.object_keys import ADAPTER_FILES, checkpoint_prefix
from core.publish import publish_adapter
from orchestrator.results import store_results_file
from tests.api.conftest import GOOD_RECORDS, upload


def step(n: int, loss: float) -> dict[str, object]:
    return {"type": "metrics", "data": {"step": n, "train_loss": loss, "learning_rate": 1e-3}}


def evaluated(n: int, valid: float, kind: str = "sample") -> dict[str, object]:
    data = {"step": n, "train_loss": 1.0, "valid_loss": valid, "valid_mean_token_accuracy": 0.5}
    return {"type": "metrics", "data": {**data, "evaluation": kind}}


def test_an_early_stopped_jobs_checkpoints_and_results_file(
    client: TestClient, tmp_path: Path
) -> None:
    services = client.app.state.services  # type: ignore[attr-defined]
    file_id = upload(client, GOOD_RECORDS)["id"]  # type: ignore[arg-type]
    job_id = client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id}
    ).json()["id"]
    store = services.store
    store.queue(job_id, "queued")
    job = store.claim(job_id, 0, "run-test", "started")
    events = [step(1, 2.0), evaluated(1, 3.0), step(2, 1.5), evaluated(2, 2.5)]
    events += [step(3, 1.2), evaluated(3, 2.6), step(4, 1.0), evaluated(4, 2.7)]
    events.append({"type": "metrics", "data": {**evaluated(2, 2.5)["data"], "evaluation": "best"}})  # type: ignore[dict-item]
    assert store.record_run_events(job_id, job.attempt, events, len(events))
    for n in (2, 4):  # the best's checkpoint, and a periodic one
        prefix = checkpoint_prefix(job.tenant, job_id, job.attempt, n)
        manifest = {"step": n, "files": {}, "metrics": {"step": n, "valid_loss": 2.0 + n}}
        services.objects.put_bytes(prefix + "manifest.json", json.dumps(manifest).encode())
    for name in ADAPTER_FILES:
        (tmp_path / name).write_bytes(b"x")
    publish_adapter(services.objects, job.tenant, job_id, job.attempt, tmp_path)
    results = store_results_file(store, services.objects, store.job(job_id))
    store.succeed(job_id, job.attempt, "ft:tiny::x", "done", results)

    listed = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["step_number"] for c in listed] == [2, 4]
    assert listed[0]["metrics"] == {
        "step": 2,
        "train_loss": 1.0,
        "valid_loss": 2.5,
        "valid_mean_token_accuracy": 0.5,
    }
    [result_id] = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["result_files"]
    content = client.get(f"/v1/files/{result_id}/content")
    assert content.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(content.text)))
    assert [(r["step"], r["train_loss"], r["valid_loss"]) for r in rows] == [
        ("1", "2.0", "3.0"),
        ("2", "1.5", "2.5"),  # a training step's figures stay; the evaluation's join them
        ("3", "1.2", "2.6"),
        ("4", "1.0", "2.7"),
    ]
    assert client.get(f"/v1/files/{result_id}").json()["purpose"] == "fine-tune-results"
