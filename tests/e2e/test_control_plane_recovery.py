"""Control-plane failure: `lorafleet serve` killed with SIGKILL mid-run and started again.
The running job's pack host (the default scheduling mode) lives on in Ray and is adopted by
the restarted serve, not restarted: the job succeeds, a job acknowledged just before the kill
is still there and runs, and nothing is duplicated."""

from __future__ import annotations

import pytest

from tests.conftest import wait_for_condition
from tests.e2e.conftest import LorafleetServer
from tests.e2e.test_training_job import DATA, started, submit, upload

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def test_a_killed_control_plane_loses_nothing(server: LorafleetServer) -> None:
    with server.client() as client:
        file_id = upload(client, DATA)
        common = {"model": "tiny-llama", "training_file": file_id, "resources": {"num_workers": 2}}
        running = submit(client, **common, seed=1, hyperparameters={"n_epochs": 40})

        def training() -> bool:
            page = client.get(f"/v1/fine_tuning/jobs/{running['id']}/events").json()["data"]
            return any(e["type"] == "metrics" for e in page)

        wait_for_condition(training, timeout=300, interval=0.3, what="the first training step")
        acknowledged = submit(client, **common, seed=2, hyperparameters={"n_epochs": 1})
    server.kill()
    server.start()

    with server.client() as client:
        done = server.wait_until_terminal(client, running["id"])
        assert done["status"] == "succeeded"
        events = server.all_events(client, running["id"])
        starts = [e for e in events if e["message"].startswith("Fine-tuning job started")]
        assert len(starts) == 1, "the running job was started again instead of adopted"
        assert started(server, client, running["id"])["run_id"].startswith("host-")
        steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
        assert steps == list(range(1, steps[-1] + 1)), "metrics were lost or stored twice"

        assert server.wait_until_terminal(client, acknowledged["id"])["status"] == "succeeded"
        listed = client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]
        ids = [j["id"] for j in listed]
        assert sorted(ids) == sorted({running["id"], acknowledged["id"]})
        checkpoints = client.get(f"/v1/fine_tuning/jobs/{running['id']}/checkpoints").json()["data"]
        assert checkpoints and checkpoints[0]["step_number"] == steps[-1]
