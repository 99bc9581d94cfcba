"""No polling between the parts, through the public API: with the scheduler's poll set to
10 minutes, a submitted job is claimed and its first metrics event is visible through the
API within a wait far shorter than that, because a new job wakes the scheduler and a host's
first step wakes it again (orchestrator.store.changes, `PackHosts.wait_for_news`).

Both topologies on one warm pack host (hosts are detached: the second topology adopts the
first's): embedded (`serve`, SQLite, the in-process wake-up), then split (`serve
--no-scheduler` + `lorafleet scheduler` on PostgreSQL, LISTEN/NOTIFY between them). The
waits assert the mechanism, not speed: each is a fraction of the poll it would otherwise
need. Latency figures are bench/arrivals.py's (--modes api-embedded,api-split)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.server_process import ServerProcess
from tests.conftest import wait_for_condition
from tests.e2e.conftest import end_pack_hosts
from tests.e2e.test_training_job import upload
from tests.services.postgres import Postgres

pytestmark = [pytest.mark.slow, pytest.mark.long]

POLL = 600.0  # the scheduler's poll: no wait below comes near it
# A claim, and a first step on a warm host, wait for no poll: seconds even on a loaded CI
# machine. The first job of all also waits for the warm host's workers to start.
CLAIMED_WITHIN = 60.0
FIRST_STEP_WITHIN = 60.0
FIRST_HOST_START = 240.0
RECORDS = [{"prompt": f"{a}+1=", "completion": f"{a + 1}"} for a in range(4)]


def submit_and_follow(client: httpx.Client, file_id: str, seed: int, first_within: float) -> str:
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "tiny",
            "training_file": file_id,
            "seed": seed,
            "hyperparameters": {"n_epochs": 1, "batch_size": 4},  # one step
        },
    )
    assert job.status_code == 200, job.text
    job_id = str(job.json()["id"])

    def status() -> str:
        return str(client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"])

    def events() -> list[dict[str, Any]]:
        page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100})
        return list(page.json()["data"])

    wait_for_condition(
        lambda: status() != "validating_files" and status() != "queued",
        timeout=CLAIMED_WITHIN,
        what=f"{job_id} to be claimed (the scheduler's poll is {POLL:g} s)",
    )
    wait_for_condition(
        lambda: any(e["type"] == "metrics" for e in events()),
        timeout=first_within,
        what=f"{job_id}'s first metrics event through the API",
    )
    wait_for_condition(
        lambda: status() == "succeeded", timeout=first_within, what=f"{job_id} to succeed"
    )
    return job_id


def test_jobs_start_and_report_at_once_with_a_ten_minute_poll_embedded_and_split(
    tmp_path: Path, tiny_base: Path, ray_address: str, postgres: Postgres
) -> None:
    namespace = f"wake-{tmp_path.name}"[:60]
    common = {
        **os.environ,
        "LORAFLEET_BASE_MODELS": json.dumps({"tiny": str(tiny_base)}),
        "LORAFLEET_OBJECT_STORE": str(tmp_path / "objects"),
        "LORAFLEET_SCHEDULER_POLL_SECONDS": str(POLL),
        "LORAFLEET_WARM_HOSTS": "1",
        "LORAFLEET_DEFAULT_NUM_WORKERS": "1",
        "LORAFLEET_RAY_NAMESPACE": namespace,
        "RAY_ADDRESS": ray_address,
    }
    try:
        # Embedded: one process, SQLite; the warm host is started by its first tick.
        embedded = ServerProcess(
            env={**common, "LORAFLEET_DATA_DIR": str(tmp_path / "embedded")},
            log=tmp_path / "embedded.log",
        )
        with embedded, embedded.client() as client:
            file_id = upload(client, RECORDS)
            try:
                submit_and_follow(client, file_id, 1, FIRST_HOST_START)
                submit_and_follow(client, file_id, 2, FIRST_STEP_WITHIN)
            except AssertionError as failure:
                raise AssertionError(f"{failure}\n{embedded.log.read_text()[-3000:]}") from None

        # Split: an API replica and a scheduler process on PostgreSQL, on the same host.
        split = {
            **common,
            "LORAFLEET_DATA_DIR": str(tmp_path / "split"),
            "LORAFLEET_DATABASE_URL": postgres.create_database(f"wake_{os.getpid()}"),
        }
        replica = ServerProcess(env=split, log=tmp_path / "replica.log")
        replica.extra_args = ("--no-scheduler",)
        with (
            replica,
            replica.client() as client,
            open(tmp_path / "scheduler.log", "wb") as log,
        ):
            scheduler = subprocess.Popen(
                [sys.executable, "-m", "api.cli", "scheduler"], env=split, stdout=log, stderr=log
            )
            try:
                file_id = upload(client, RECORDS)
                # The first job may meet the scheduler's first tick; the second only a wake-up.
                submit_and_follow(client, file_id, 3, FIRST_HOST_START)
                submit_and_follow(client, file_id, 4, FIRST_STEP_WITHIN)
            except AssertionError as failure:
                logs = (tmp_path / "scheduler.log").read_text()[-3000:]
                raise AssertionError(f"{failure}\nscheduler:\n{logs}") from None
            finally:
                scheduler.terminate()
                scheduler.wait(timeout=60)
    finally:
        end_pack_hosts(namespace)
