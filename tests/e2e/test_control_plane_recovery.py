"""Control-plane failure: `lorafleet serve` killed with SIGKILL mid-run and started again.
The running job's pack host lives on in Ray and is adopted by
the restarted serve, not restarted: the job succeeds, a job acknowledged just before the kill
is still there and runs, and nothing is duplicated. In the embedded default (no Ray address)
serve's own Ray is a process of its own: it and its hosts outlive a SIGKILL of serve, the
restarted serve reconnects, and a clean stop of serve ends that Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.scheduling import embedded_ray
from tests.conftest import wait_for_condition
from tests.e2e.conftest import LorafleetServer
from tests.e2e.test_training_job import DATA, started, submit, upload

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def test_a_killed_control_plane_loses_nothing(server: LorafleetServer) -> None:
    with server.client() as client:
        file_id = upload(client, DATA)
        common = {"model": "tiny-llama", "training_file": file_id, "resources": {"num_workers": 2}}
        running = submit(client, **common, seed=1, hyperparameters={"n_epochs": 20})

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


# ---- the embedded default: serve's own Ray outlives a SIGKILL of serve ----

HOSTS_SCRIPT = """
import json, sys, ray
ray.init(address=sys.argv[1], namespace="lorafleet", log_to_driver=False)
out = {}
for entry in ray.util.list_named_actors(all_namespaces=True):
    if entry["name"].startswith("lorafleet-host-"):
        actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
        report = ray.get(actor.poll.remote({}), timeout=60)
        out[entry["name"]] = {"actor_id": actor._actor_id.hex(), "pids": report["worker_pids"],
                              "worker_starts": report["worker_starts"]}
print(json.dumps(out))
"""


def hosts_on(address: str) -> dict[str, Any]:
    """Each pack host on the Ray at `address`: its actor id and worker pids, as it reports
    them (asked from a driver of its own: this test process is a driver of another Ray)."""
    done = subprocess.run(
        [sys.executable, "-c", HOSTS_SCRIPT, address],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.fixture()
def embedded_server(tmp_path: Path, tiny_base: Path) -> Iterator[LorafleetServer]:
    """`lorafleet serve` with no Ray address: it starts the data dir's own Ray."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LORAFLEET_RAY_ADDRESS")}
    env.update(
        LORAFLEET_DATA_DIR=str(tmp_path / "state"),
        LORAFLEET_BASE_MODELS=json.dumps({"tiny-llama": str(tiny_base)}),
        LORAFLEET_SCHEDULER_POLL_SECONDS="0.2",
        LORAFLEET_CHECKPOINT_EVERY_STEPS="20",
        LORAFLEET_HOST_IDLE_SECONDS="5",
    )
    server = LorafleetServer(env=env, log=tmp_path / "server.log")
    server.start()
    yield server
    server.stop()
    embedded_ray.stop(tmp_path / "state")  # if the test failed before its clean stop


def test_a_killed_serve_keeps_its_ray_and_hosts_and_a_clean_stop_ends_them(
    embedded_server: LorafleetServer,
) -> None:
    server = embedded_server
    data_dir = Path(server.env["LORAFLEET_DATA_DIR"])
    with server.client() as client:
        file_id = upload(client, DATA)
        job = submit(
            client,
            model="tiny-llama",
            training_file=file_id,
            seed=1,
            hyperparameters={"n_epochs": 30, "batch_size": 2},  # outlives a serve restart
            resources={"num_workers": 2},
        )

        def training() -> bool:
            page = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
            return any(e["type"] == "metrics" for e in page)

        wait_for_condition(training, timeout=400, interval=0.3, what="the first training step")
    ray_head = embedded_ray.read_record(data_dir)
    assert ray_head is not None and ray_head.alive()
    before = hosts_on(ray_head.address)
    assert len(before) == 1, before

    server.kill()
    server.start()
    with server.client() as client:
        # Reconnected to the same Ray: same head process, same host actor and workers.
        assert embedded_ray.read_record(data_dir) == ray_head and ray_head.alive()
        assert hosts_on(ray_head.address) == before, "the pack host was restarted"
        done = server.wait_until_terminal(client, job["id"])
        assert done["status"] == "succeeded", done
        events = server.all_events(client, job["id"])
        starts = [e for e in events if e["message"].startswith("Fine-tuning job started")]
        assert len(starts) == 1, "the job was requeued instead of continuing on its host"
        assert started(server, client, job["id"])["attempt"] == 1
        steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
        assert steps == list(range(1, steps[-1] + 1)), "steps were repeated or lost"

    processes = ray_head.processes()
    assert len(processes) > 3  # head, GCS, raylet, agents, the host's workers
    server.stop()  # SIGTERM: a clean shutdown ends the Ray it started, and only that

    def ended() -> bool:
        return not any(embedded_ray.process_alive(pid) for pid in processes)

    wait_for_condition(ended, timeout=60, what="every process of serve's Ray to end")
    assert embedded_ray.read_record(data_dir) is None
