"""Packing as a user sees it (the default mode, warm pack hosts): jobs submitted together
share one pack host and train in one pack, a short one succeeds while the others still
train, and cancelling one leaves the other running to the end."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import wait_for_condition
from tests.e2e.conftest import LorafleetServer
from tests.e2e.test_training_job import DATA, started, submit, upload

pytestmark = [pytest.mark.slow, pytest.mark.long]


def status(client: httpx.Client, job_id: str) -> str:
    return str(client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"])


def run_of(server: LorafleetServer, client: httpx.Client, job_id: str) -> str:
    return str(started(server, client, job_id)["run_id"])


def test_jobs_submitted_together_share_a_run_and_leave_it_one_by_one(
    server: LorafleetServer,
) -> None:
    with server.client() as client:
        file_id = upload(client, DATA)
        common: dict[str, Any] = {
            "model": "tiny-llama",
            "training_file": file_id,
            "resources": {"num_workers": 2},
        }
        short = submit(client, **common, seed=1, hyperparameters={"n_epochs": 1})
        long = submit(client, **common, seed=2, hyperparameters={"n_epochs": 40})
        doomed = submit(client, **common, seed=3, hyperparameters={"n_epochs": 100})
        ids = [short["id"], long["id"], doomed["id"]]

        wait_for_condition(
            lambda: status(client, short["id"]) == "succeeded", timeout=300, interval=0.3
        )
        assert status(client, long["id"]) == "running"
        assert status(client, doomed["id"]) == "running"
        hosts = {run_of(server, client, i) for i in ids}
        assert len(hosts) == 1 and next(iter(hosts)).startswith("host-"), hosts
        first = next(e for e in server.all_events(client, short["id"]) if e["type"] == "metrics")
        assert first["data"]["pack_size"] == 3
        adapter = client.get(f"/v1/fine_tuning/jobs/{short['id']}/adapter", follow_redirects=True)
        assert adapter.status_code == 200

        assert client.post(f"/v1/fine_tuning/jobs/{doomed['id']}/cancel").status_code == 200
        assert (
            server.wait_until_terminal(client, doomed["id"], timeout=120)["status"] == "cancelled"
        )
        assert status(client, long["id"]) == "running"
        assert server.wait_until_terminal(client, long["id"])["status"] == "succeeded"
        steps = [e["data"] for e in server.all_events(client, long["id"]) if e["type"] == "metrics"]
        assert steps[-1]["step"] == steps[-1]["total_steps"] and steps[-1]["pack_size"] == 1
