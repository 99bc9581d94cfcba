"""Warm pack hosts through the public API: a second job
joins the pack host the first is training on, while it trains; the first job's pack size
goes 1 → 2 → 1; both succeed on one host, and each adapter equals the same job trained
alone on a host of its own (fp32, ≤ 1e-5); a job past its max_runtime fails with timeout."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for_condition
from tests.e2e.conftest import LorafleetServer, running_server, shared_ray_env
from tests.e2e.test_bf16_packing_over_http import adapter_tensors
from tests.e2e.test_training_job import DATA, submit, upload

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hosts_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, ray_address: str
) -> Iterator[LorafleetServer]:
    folder = tmp_path_factory.mktemp("hosts-server")
    env = shared_ray_env(
        folder, tiny_base, ray_address, host_idle_seconds="30", max_concurrent_runs="1"
    )
    with running_server(env, folder) as server:
        yield server


FP32 = {"precision": "fp32"}
A_SPEC: dict[str, Any] = {"seed": 1, "hyperparameters": {"n_epochs": 30, "batch_size": 4}}
B_SPEC: dict[str, Any] = {"seed": 2, "hyperparameters": {"n_epochs": 2, "batch_size": 4}}


def metrics(server: LorafleetServer, client: Any, job_id: str) -> list[dict[str, Any]]:
    return [e["data"] for e in server.all_events(client, job_id) if e["type"] == "metrics"]


def test_a_second_job_joins_the_running_host(hosts_server: LorafleetServer) -> None:
    server = hosts_server
    with server.client() as client:
        file_id = upload(client, DATA)
        common: dict[str, Any] = {
            "model": "tiny-llama",
            "training_file": file_id,
            "resources": {"num_workers": 2},
        }
        a = submit(client, **common, training=FP32, **A_SPEC)
        wait_for_condition(
            lambda: any(m["step"] > 0 for m in metrics(server, client, a["id"])),
            timeout=300,
            interval=0.3,
            what="job A's first step",
        )
        submitted = time.time()
        b = submit(client, **common, training=FP32, **B_SPEC)
        assert server.wait_until_terminal(client, b["id"])["status"] == "succeeded"
        first_step = min(m["time"] for m in metrics(server, client, b["id"]))
        print(f"job B: submit -> first step {first_step - submitted:.2f} s (joined a warm host)")
        assert server.wait_until_terminal(client, a["id"])["status"] == "succeeded"
        sizes = [m["pack_size"] for m in metrics(server, client, a["id"])]
        # A trained alone, then with B, then alone again: B joined a running pack.
        collapsed = [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]]
        assert collapsed == [1, 2, 1], sizes
        hosts = {
            e["data"]["run_id"]
            for job in (a, b)
            for e in server.all_events(client, job["id"])
            if "run_id" in (e["data"] or {})
        }
        assert len(hosts) == 1 and next(iter(hosts)).startswith("host-")

        # Exactness (fp32): each job equals the same job trained alone, on a host of its own
        # (`packing: false`): B is not changed by joining, A not by B's join and leave.
        alone = {
            job["id"]: submit(client, **{**common, "training": {**FP32, "packing": False}}, **spec)
            for job, spec in ((a, A_SPEC), (b, B_SPEC))
        }
        for packed_id, own in alone.items():
            assert server.wait_until_terminal(client, own["id"])["status"] == "succeeded"
            own_run = {
                e["data"]["run_id"]
                for e in server.all_events(client, own["id"])
                if "run_id" in (e["data"] or {})
            }
            assert len(own_run) == 1 and not own_run & hosts, own_run  # a host of its own
            sizes = [m["pack_size"] for m in metrics(server, client, own["id"])]
            assert set(sizes) == {1}, sizes
            mine, reference = (
                adapter_tensors(client, packed_id),
                adapter_tensors(client, own["id"]),
            )
            assert mine.keys() == reference.keys() and mine
            worst = max((mine[k] - reference[k]).abs().max().item() for k in mine)
            print(f"{packed_id}: largest difference from training alone {worst:.2e}")
            assert worst <= 1e-5, f"{packed_id}: differs from training alone by {worst}"
            assert any(t.abs().max() > 0 for k, t in mine.items() if "lora_B" in k)


def test_a_job_past_its_max_runtime_fails_with_timeout(hosts_server: LorafleetServer) -> None:
    server = hosts_server
    with server.client() as client:
        file_id = upload(client, DATA)
        job = submit(
            client,
            model="tiny-llama",
            training_file=file_id,
            resources={"num_workers": 2},
            hyperparameters={"n_epochs": 100},
            max_runtime=5,
        )
        ended = server.wait_until_terminal(client, job["id"], timeout=300)
        assert ended["status"] == "failed" and ended["error"]["code"] == "timeout"
