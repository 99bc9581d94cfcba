"""Fencing reaches the object store: each attempt of a job writes its adapter and its
checkpoints under its own keys, so a stale host (an older attempt still alive after a
requeue) can never replace what the current attempt published, nor be resumed from."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from fastapi.testclient import TestClient

from api.app import create_app
from core.checkpoint_index import list_checkpoints, prune_checkpoints
from core.object_keys import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    adapter_key,
    checkpoint_prefix,
)
from core.objectstore import ObjectStore, open_object_store
from core.publish import publish_adapter, sha256_hex, verify_adapter
from orchestrator.scheduling.ray_connection import RayConnection
from orchestrator.scheduling.scheduler import Scheduler
from orchestrator.settings import Settings
from orchestrator.store import JobStore
from tests.conftest import job_row


def adapter_folder(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / ADAPTER_CONFIG).write_text(json.dumps({"r": 8}))
    (folder / ADAPTER_WEIGHTS).write_bytes(weights)
    return folder


def save_checkpoint(objects: ObjectStore, job_id: str, attempt: int, step: int) -> None:
    prefix = checkpoint_prefix("default", job_id, attempt, step)
    objects.put_bytes(prefix + ADAPTER_WEIGHTS, f"{attempt}/{step}".encode())
    objects.put_bytes(prefix + MANIFEST, json.dumps({"step": step, "files": {}}).encode())


def test_a_stale_attempts_late_publish_cannot_replace_the_current_one(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "state")
    with TestClient(create_app(settings)) as client:
        store: JobStore = client.app.state.services.store  # type: ignore[attr-defined]
        objects: ObjectStore = client.app.state.services.objects  # type: ignore[attr-defined]
        job = store.add_job(job_row(tenant="default"), "Created")
        store.queue(job.id, "queued")
        store.claim(job.id, 0, "run-1", "attempt 1")
        store.requeue(job.id, 1, "run 1 stopped answering")  # run 1 lives on, stale
        current = store.claim(job.id, 1, "run-2", "attempt 2")

        publish_adapter(objects, "default", job.id, 2, adapter_folder(tmp_path / "a2", b"two"))
        scheduler = Scheduler(settings, store, objects, RayConnection(settings))
        scheduler.outcomes.succeed(current)  # verifies and archives attempt 2's adapter
        assert store.job(job.id).status == "succeeded"

        # The stale attempt finishes late and publishes too.
        publish_adapter(objects, "default", job.id, 1, adapter_folder(tmp_path / "a1", b"one"))

        response = client.get(f"/v1/fine_tuning/jobs/{job.id}/adapter")
        assert response.status_code == 200, response.text
        with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
            weights = tar.extractfile(ADAPTER_WEIGHTS)
            assert weights is not None and weights.read() == b"two"
        manifest = verify_adapter(objects, "default", job.id, 2)  # whole, and attempt 2's
        assert manifest.files[ADAPTER_WEIGHTS]["sha256"] == sha256_hex(b"two")
        assert objects.get_bytes(adapter_key("default", job.id, 2, ADAPTER_WEIGHTS)) == b"two"


def test_resume_and_pruning_only_see_attempts_up_to_their_own(tmp_path: Path) -> None:
    objects = open_object_store(Settings(data_dir=tmp_path).object_store_config)
    for attempt, step in ((1, 10), (1, 20), (2, 15), (3, 5)):
        save_checkpoint(objects, "ftjob-x", attempt, step)
    newest_first = [(c.attempt, c.step) for c in list_checkpoints(objects, "default", "ftjob-x")]
    assert newest_first == [(3, 5), (2, 15), (1, 20), (1, 10)]  # by (attempt, step)
    seen_by_2 = list_checkpoints(objects, "default", "ftjob-x", up_to_attempt=2)
    assert [(c.attempt, c.step) for c in seen_by_2] == [(2, 15), (1, 20), (1, 10)]
    # A stale attempt 1 pruning to one checkpoint never touches attempts 2 and 3.
    prune_checkpoints(objects, "default", "ftjob-x", 1, keep_last=1)
    left = [(c.attempt, c.step) for c in list_checkpoints(objects, "default", "ftjob-x")]
    assert left == [(3, 5), (2, 15), (1, 20)]
