"""Event order between rank 0 and the run's actor: numbered at the sender, applied in that
order by the (threaded) actor whatever order Ray runs the calls in; an ended job takes no
more events; a failed job's traceback reaches the worker's log."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from core.objectstore import ObjectStoreConfig
from core.spec import JobSpec, RunSpec
from workers.host.step import PackContext, report_job_failure
from workers.lora.packed_layer import Routing
from workers.run_actor import NAMESPACE, RUNNING, SUCCEEDED, RunActor, run_actor_name
from workers.run_events import EventNumbering, EventOrder


def event(numbering: EventNumbering, kind: str, job_id: str = "job-1") -> dict[str, Any]:
    return numbering.stamp({"job_id": job_id, "type": kind, "message": kind, "data": {}})


def test_events_come_out_in_send_order_whatever_order_they_arrive_in() -> None:
    sender, order = EventNumbering(attempt=0), EventOrder()
    sent = [event(sender, f"metrics-{i}") for i in range(5)]
    assert order.accept(sent[2]) == [] and order.accept(sent[1]) == []
    assert [e["type"] for e in order.accept(sent[0])] == ["metrics-0", "metrics-1", "metrics-2"]
    assert order.accept(sent[4]) == [] and order.held() == 1
    # A restarted group numbers from 0 again; the dead group's held events are flushed.
    restarted = EventNumbering(attempt=1)
    assert [e["type"] for e in order.accept(event(restarted, "message"))] == ["message"]
    assert [e["type"] for e in order.flush_before(1)] == ["metrics-4"] and order.held() == 0


JOB = JobSpec("job-1", "t", 1, "tiny", "", "files/x.jsonl")


def spec(tmp_path: Path) -> RunSpec:
    return RunSpec(
        run_id="events-order",
        jobs=(JOB,),
        num_workers=1,
        use_gpu=False,
        object_store=ObjectStoreConfig(url=str(tmp_path)),
        model_cache_dir=tmp_path,
        storage_path=tmp_path,
    )


def test_the_actor_never_ends_a_job_before_its_earlier_events(
    ray_address: str, tmp_path: Path
) -> None:
    import ray

    actor = RunActor.options(  # type: ignore[attr-defined]
        name=run_actor_name("events-order"), namespace=NAMESPACE
    ).remote(spec(tmp_path))
    try:
        sender = EventNumbering(attempt=0)
        metrics, published = event(sender, "metrics"), event(sender, "published")
        late = event(sender, "metrics")
        ray.get(actor.record.remote([published]))  # Ray ran the later call first
        polled = ray.get(actor.poll.remote("job-1", 0))
        assert polled["state"] == RUNNING and polled["events"] == []
        ray.get(actor.record.remote([metrics]))
        polled = ray.get(actor.poll.remote("job-1", 0))
        assert polled["state"] == SUCCEEDED
        assert [e["type"] for e in polled["events"]] == ["metrics", "published"]
        ray.get(actor.record.remote([late]))  # after the end: refused, not appended
        assert ray.get(actor.poll.remote("job-1", 2))["events"] == []
    finally:
        ray.kill(actor)


def test_a_steps_events_arrive_in_one_call_and_batches_apply_in_send_order(
    ray_address: str, tmp_path: Path
) -> None:
    """Rank 0 sends each step's events (all jobs) in one call; two steps' calls may run in
    either order on the threaded actor, and still apply in the order they were sent."""
    import ray

    two_jobs = replace(
        spec(tmp_path), run_id="events-batches", jobs=(JOB, replace(JOB, job_id="job-2"))
    )
    actor = RunActor.options(  # type: ignore[attr-defined]
        name=run_actor_name("events-batches"), namespace=NAMESPACE
    ).remote(two_jobs)
    try:
        sender = EventNumbering(attempt=0)
        step_1 = [event(sender, "metrics", "job-1"), event(sender, "metrics", "job-2")]
        step_2 = [
            event(sender, "checkpoint", "job-1"),
            event(sender, "metrics", "job-2"),
            event(sender, "published", "job-1"),
        ]
        ray.get(actor.record.remote(step_2))  # the later step's call ran first
        assert ray.get(actor.poll.remote("job-1", 0))["events"] == []
        ray.get(actor.record.remote(step_1))
        one, two = (ray.get(actor.poll.remote(j, 0)) for j in ("job-1", "job-2"))
        assert [e["type"] for e in one["events"]] == ["metrics", "checkpoint", "published"]
        assert [e["type"] for e in two["events"]] == ["metrics", "metrics"]
        assert (one["state"], two["state"]) == (SUCCEEDED, RUNNING)
    finally:
        ray.kill(actor)


def test_a_job_failure_logs_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    sent: list[tuple[Any, ...]] = []
    ctx = PackContext(
        model=torch.nn.Linear(1, 1),
        routing=Routing(),
        pad_token_id=0,
        device=torch.device("cpu"),
        rank=0,
        world_size=1,
        report=lambda *args: sent.append(args),
    )
    try:
        raise ValueError("bad data in line 3")
    except ValueError as exc:
        with caplog.at_level(logging.ERROR, logger="lorafleet.worker"):
            report_job_failure(ctx, "job-1", exc)
    [record] = caplog.records
    assert record.exc_info is not None and "bad data in line 3" in caplog.text
    assert "Traceback" in caplog.text and "test_a_job_failure_logs_its_traceback" in caplog.text
    assert sent[0][:2] == ("job-1", "job_failed")
