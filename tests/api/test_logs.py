"""LORAFLEET_LOG_FORMAT=json: the scheduler's log lines about a job are JSON objects that
carry the job id, its run or pack host id and the attempt."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.ops import configure_logging
from orchestrator.jobs import NewJob, resolve_settings
from orchestrator.scheduling.ray_connection import RayConnection
from orchestrator.scheduling.scheduler import Scheduler
from tests.conftest import job_row
from tests.orchestrator.test_host_scheduling import make_world


@pytest.fixture()
def json_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Logging configured the way `lorafleet serve`/`scheduler` does it, with the variable
    set, its handler writing into a buffer; the root logger is put back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setenv("LORAFLEET_LOG_FORMAT", "json")
    configure_logging()
    buffer = io.StringIO()
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in buffer.getvalue().splitlines()]

    yield lines
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_scheduler_tick_logs_json_with_job_host_and_attempt(
    json_logs: Any, tmp_path: Path, ray_address: str
) -> None:
    world = make_world(tmp_path)
    scheduler = Scheduler(
        world.settings, world.store, world.objects, RayConnection(world.settings), world.hosts
    )
    job_id = world.submit()
    scheduler.tick()
    job = world.job(job_id)
    lines = json_logs()
    joined = [line for line in lines if line.get("job_id") == job_id]
    assert joined, lines
    line = joined[0]
    assert line["logger"] == "orchestrator.scheduling.host_scheduling" and line["level"] == "INFO"
    assert line["host_id"] == line["run_id"] == job.run_id
    assert line["attempt"] == job.attempt == 1
    assert line["tenant"] == "t1"
    assert job_id in line["message"] and "time" in line
    started = [line for line in lines if line.get("host_id") and "job_id" not in line]
    assert started and started[0]["host_id"] == job.run_id


def test_a_failed_job_logs_its_context(json_logs: Any, tmp_path: Path, ray_address: str) -> None:
    """A job whose training file is gone fails at validation: attempt 0, on no host."""
    world = make_world(tmp_path)
    scheduler = Scheduler(
        world.settings, world.store, world.objects, RayConnection(world.settings), world.hosts
    )
    job = job_row(
        training_file="file-gone",
        settings=resolve_settings(NewJob(model="tiny", training_file="file-gone"), 2),
    )
    job_id = world.store.add_job(job, "created").id
    scheduler.tick()
    assert world.job(job_id).status == "failed"
    (line,) = [line for line in json_logs() if line.get("job_id") == job_id]
    assert line["level"] == "WARNING" and "invalid_file" in line["message"]
    assert line["attempt"] == 0 and line["run_id"] is None
