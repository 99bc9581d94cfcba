"""Rank 0's writer against a real S3 server (radosgw) that goes away: a finished job's
adapter is kept and published once the store is back, or the job fails past the retry
window; checkpoints that fall due meanwhile are skipped with one event. Also the pure
retry bookkeeping (core/store_outage.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from core.checkpoint_index import list_checkpoints
from core.objectstore import ObjectStoreConfig, open_object_store
from core.publish import verify_adapter
from core.spec import JobSpec
from core.store_outage import RetryWindow
from tests.conftest import wait_for_condition
from tests.services.radosgw import RadosGW
from workers.host.writer import SlotWriter

PATHS = ["model.layers.0.self_attn.q_proj"]
JOB = JobSpec("job-1", "t", 1, "tiny", "", "files/t/x.jsonl")


class Events:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def __call__(self, job_id: str | None, kind: str, message: str, data: Any = None) -> None:
        self.items.append({"job_id": job_id, "type": kind, "message": message, "data": data})

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.items if e["type"] == kind]

    def saying(self, text: str) -> list[dict[str, Any]]:
        return [e for e in self.items if text in e["message"]]


def factors() -> dict[str, torch.Tensor]:
    path = f"base_model.model.{PATHS[0]}"
    return {
        f"{path}.lora_A.weight": torch.randn(8, 64),
        f"{path}.lora_B.weight": torch.randn(64, 8),
    }


@pytest.fixture()
def config(radosgw: RadosGW, s3_bucket: str) -> Iterator[ObjectStoreConfig]:
    yield ObjectStoreConfig(
        url=f"s3://{s3_bucket}/lorafleet",
        endpoint_url=radosgw.endpoint_url,
        access_key_id=radosgw.access_key_id,
        secret_access_key=radosgw.secret_access_key,
    )
    radosgw.start_gateway()  # whatever the test did, the next one finds it up


def test_retry_window_doubles_its_waits_within_the_window_and_reports_once_a_minute() -> None:
    window = RetryWindow(window_s=100.0, started_at=0.0, max_delay_s=30.0)
    assert [window.failed(now) for now in (0.0, 1.0, 3.0, 7.0, 15.0, 31.0)] == [
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        30.0,  # capped
    ]
    assert window.failed(95.0) == 5.0  # the last wait ends with the window: one more try there
    assert window.failed(100.0) is None and window.failures == 8
    assert [window.report_due(now) for now in (0.0, 30.0, 59.9, 60.0, 100.0, 120.0)] == [
        True,
        False,
        False,
        True,
        False,
        True,
    ]


@pytest.mark.faults
def test_a_publish_waits_for_the_store_and_lands_when_it_is_back(
    radosgw: RadosGW, config: ObjectStoreConfig
) -> None:
    events = Events()
    writer = SlotWriter(config, keep_last=3, report=events, publish_retry_seconds=120)
    radosgw.stop_gateway()
    writer.publish(JOB, PATHS, factors(), {"steps": 10})
    wait_for_condition(
        lambda: bool(events.saying("Object store unavailable; retrying publish")),
        timeout=60,
        what="the publish to report the store away",
    )
    assert not events.of("published") and not events.of("job_failed")
    assert writer.publishing() == [JOB.job_id]  # what the host tells its watchdog
    time.sleep(5)  # several tries fail meanwhile; they are not each reported
    (waiting,) = events.saying("retrying publish")  # once, not once per try
    # "attempt" in an event's data is the job's attempt: the host drops a mismatch.
    assert "attempt" not in waiting["data"] and waiting["data"]["publish_attempt"] == 2
    radosgw.start_gateway()
    wait_for_condition(lambda: bool(events.of("published")), timeout=90, what="the publish")
    writer.close()
    assert writer.publishing() == []
    published = events.of("published")[0]
    assert published["data"]["publish_attempts"] > 2 and published["data"]["steps"] == 10
    assert not events.of("job_failed")
    store = open_object_store(config)
    manifest = verify_adapter(store, JOB.tenant, JOB.job_id, JOB.attempt)
    assert manifest.files == published["data"]["files"]


@pytest.mark.faults
def test_past_the_retry_window_the_job_fails_as_publish_failed(
    radosgw: RadosGW, config: ObjectStoreConfig
) -> None:
    events = Events()
    writer = SlotWriter(config, keep_last=3, report=events, publish_retry_seconds=3)
    radosgw.stop_gateway()
    writer.publish(JOB, PATHS, factors(), {})
    writer.close()
    failed = events.of("job_failed")
    assert len(failed) == 1 and not events.of("published"), events.items
    assert failed[0]["data"]["error_code"] == "publish_failed"
    assert "unavailable" in failed[0]["message"]


@pytest.mark.faults
def test_checkpoints_in_an_outage_are_skipped_with_one_event_and_resume_after(
    radosgw: RadosGW, config: ObjectStoreConfig
) -> None:
    events = Events()
    writer = SlotWriter(config, keep_last=3, report=events, publish_retry_seconds=60)
    radosgw.stop_gateway()
    for step in (10, 20):
        done = threading.Event()
        writer.checkpoint(JOB, PATHS, factors(), {"step": step}, {"step": step})
        writer._queue.put(done.set)  # noqa: SLF001 - wait for this write's turn to end
        assert done.wait(timeout=60)
    skipped = events.saying("checkpoint at step")
    assert [e["data"]["step"] for e in skipped] == [10], events.items  # once per outage
    assert not events.of("checkpoint") and not events.of("job_failed")
    radosgw.start_gateway()
    writer.checkpoint(JOB, PATHS, factors(), {"step": 30}, {"step": 30})
    writer.close()
    assert [e["data"]["step"] for e in events.of("checkpoint")] == [30]
    store = open_object_store(config)
    assert [c.step for c in list_checkpoints(store, JOB.tenant, JOB.job_id)] == [30]
