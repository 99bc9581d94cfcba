"""Several schedulers: on PostgreSQL two scheduler processes share a dozen queued jobs and
each job runs exactly once; on SQLite a second scheduler waits for the first to end and
says for which process."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from orchestrator.scheduling.scheduler import hold_single_scheduler_lock
from orchestrator.settings import Settings
from tests.conftest import wait_for_condition
from tests.services.postgres import Postgres

# Enough for both schedulers to contend for every claim and host admission (each tick
# sees several queued jobs), few enough to keep the test short.
JOBS = 12


def test_sqlite_keeps_a_single_scheduler_and_a_second_waits_for_the_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'lorafleet.db'}"
    first = hold_single_scheduler_lock(url)
    assert first is not None
    caplog.set_level(logging.WARNING, logger="orchestrator.scheduling.scheduler")
    got: list[IO[str] | None] = []
    second = threading.Thread(target=lambda: got.append(hold_single_scheduler_lock(url)))
    second.start()
    wait_for_condition(lambda: "waiting for the scheduler lock" in caplog.text, timeout=10)
    assert f"held by pid {os.getpid()}" in caplog.text and "PostgreSQL" in caplog.text
    second.join(timeout=1)
    assert second.is_alive() and not got  # still waiting: never two at once
    first.close()  # the first scheduler exits
    second.join(timeout=10)
    assert got and got[0] is not None
    assert "scheduler lock acquired" in caplog.text
    # A stop while waiting ends the wait with no lock.
    stop = threading.Event()
    third: list[IO[str] | None] = []
    waiting = threading.Thread(target=lambda: third.append(hold_single_scheduler_lock(url, stop)))
    waiting.start()
    stop.set()
    waiting.join(timeout=10)
    assert third == [None]
    got[0].close()
    assert hold_single_scheduler_lock(url) is not None  # free again once the others are gone


def test_postgresql_needs_no_lock(postgres: Postgres) -> None:
    assert hold_single_scheduler_lock(postgres.url) is None


@pytest.mark.slow
@pytest.mark.long
def test_two_schedulers_run_each_of_12_jobs_exactly_once(
    postgres: Postgres, tiny_base: Path, ray_address: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "LORAFLEET_DATA_DIR": str(tmp_path / "state"),
        "LORAFLEET_DATABASE_URL": postgres.create_database("two_schedulers"),
        "LORAFLEET_OBJECT_STORE": str(tmp_path / "objects"),
        "LORAFLEET_BASE_MODELS": json.dumps({"tiny": str(tiny_base)}),
        "LORAFLEET_MAX_CONCURRENT_RUNS": "1",  # a host each: both contend for every job
        "LORAFLEET_SCHEDULER_POLL_SECONDS": "0.2",
        "RAY_ADDRESS": ray_address,
    }
    settings = Settings(
        data_dir=tmp_path / "state",
        database_url=env["LORAFLEET_DATABASE_URL"],
        object_store=env["LORAFLEET_OBJECT_STORE"],
        base_models={"tiny": str(tiny_base)},
    )
    with TestClient(create_app(settings)) as client:
        rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(4)]
        body = "\n".join(json.dumps(r) for r in rows).encode()
        file_id = client.post(
            "/v1/files", files={"file": ("d.jsonl", body)}, data={"purpose": "fine-tune"}
        ).json()["id"]
        job_ids = [
            client.post(
                "/v1/fine_tuning/jobs",
                json={
                    "model": "tiny",
                    "training_file": file_id,
                    "seed": i,
                    "hyperparameters": {"n_epochs": 1, "batch_size": 4},
                },
            ).json()["id"]
            for i in range(JOBS)
        ]
        logs = [open(tmp_path / f"scheduler-{i}.log", "wb") for i in range(2)]  # noqa: SIM115
        schedulers = [
            subprocess.Popen(
                [sys.executable, "-m", "api.cli", "scheduler"], env=env, stdout=log, stderr=log
            )
            for log in logs
        ]
        try:

            def all_done() -> bool:
                statuses = [
                    client.get(f"/v1/fine_tuning/jobs/{j}").json()["status"] for j in job_ids
                ]
                assert "failed" not in statuses, (tmp_path / "scheduler-0.log").read_text()[-3000:]
                return all(s == "succeeded" for s in statuses)

            wait_for_condition(all_done, timeout=600, interval=1, what=f"{JOBS} jobs to succeed")
        finally:
            for process in schedulers:
                process.terminate()
            for process in schedulers:
                process.wait(timeout=60)
        for job_id in job_ids:
            job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            events = client.get(
                f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}
            ).json()["data"]
            starts = [e for e in events if e["message"].startswith("Fine-tuning job started")]
            assert len(starts) == 1, (job_id, [e["message"] for e in events])
            published = [e for e in events if e["message"].startswith("Adapter published")]
            assert len(published) == 1, job_id
            assert job["status"] == "succeeded"
