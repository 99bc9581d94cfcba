"""Admission by the memory estimate, through the public API on a real pack host: with a
host memory budget that holds two of these jobs (by admission's estimate) and one host at
most, two jobs train together and the third stays queued while they train; it joins once
one of them leaves. Each job's "memory" events show, per membership, the peak per rank the
host measured and admission's estimate for the same jobs, within ±20% of each other. A job
no host could hold is refused at submission (400, the estimate and the budget named)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.base_catalog import local_base_shape
from core.memory_estimate import estimate_rank_bytes, host_run_shape, slot_demand
from tests.conftest import wait_for_condition
from tests.e2e.conftest import LorafleetServer, running_server, shared_ray_env
from tests.e2e.test_training_job import submit, upload
from tests.workers.test_host_memory import MAX_SEQ_LEN, ROWS, long_rows

pytestmark = [pytest.mark.slow, pytest.mark.long]
WORKERS, BATCH, RANK = 2, 4, 8
LORA = {"r": RANK, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}


def budget_for_two(tiny_base: Path) -> tuple[int, int, int]:
    """(two jobs, a budget between two and three jobs, three jobs), jobs counted as
    admission and the host count them: the base's terms once, plus each job's share."""
    base = local_base_shape(tiny_base)
    run = host_run_shape(
        num_workers=WORKERS,
        precision="fp32",
        gradient_checkpointing=False,
        loss_chunk_tokens=4096,
        persistence_threshold=0,
    )
    demand = slot_demand(
        batch_size=BATCH,
        num_workers=WORKERS,
        max_seq_len=MAX_SEQ_LEN,
        lora_r=RANK,
        target_modules="all-linear",
        dataset_rows=ROWS,  # every job trains on one file of ROWS rows
    )
    alone = estimate_rank_bytes(base, run, [demand]).parts
    held = alone["base_shard"] + alone["live_parameters"]
    two, three = (held + n * (sum(alone.values()) - held) for n in (2, 3))
    return two, (two + three) // 2, three


@pytest.fixture(scope="module")
def budget_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, ray_address: str
) -> Iterator[LorafleetServer]:
    folder = tmp_path_factory.mktemp("memory-server")
    _, budget, _ = budget_for_two(tiny_base)
    env = shared_ray_env(
        folder,
        tiny_base,
        ray_address,
        host_idle_seconds="30",
        max_concurrent_runs="1",  # one host: the third job cannot go elsewhere
        host_memory_bytes=str(budget),
        loss_chunk_tokens="4096",
        gradient_checkpointing="false",
        zero3_param_persistence_threshold="0",
        checkpoint_every_steps="0",
    )
    with running_server(env, folder) as server:
        yield server


def events_of(server: LorafleetServer, client: Any, job_id: str, kind: str) -> list[Any]:
    return [e["data"] for e in server.all_events(client, job_id) if e["type"] == kind]


def test_jobs_are_admitted_until_the_estimate_says_full_and_the_next_waits(
    budget_server: LorafleetServer, tiny_base: Path
) -> None:
    server = budget_server
    two, budget, three = budget_for_two(tiny_base)
    assert two <= budget < three
    with server.client() as client:
        file_id = upload(client, [json.loads(line) for line in long_rows(7).splitlines()])

        def job(epochs: int) -> str:
            return str(
                submit(
                    client,
                    model="tiny-llama",
                    training_file=file_id,
                    resources={"num_workers": WORKERS},
                    hyperparameters={"n_epochs": epochs, "batch_size": BATCH},
                    training={"precision": "fp32", "max_seq_len": MAX_SEQ_LEN},
                    lora=LORA,
                )["id"]
            )

        a, b, c = job(12), job(8), job(3)  # 48, 32 and 12 steps

        def training(job_id: str) -> bool:
            return bool(events_of(server, client, job_id, "metrics"))

        wait_for_condition(
            lambda: training(a) and training(b), timeout=300, interval=0.3, what="A and B train"
        )
        # While both train, C waits: over several scheduler ticks it is still queued.
        samples = 0
        while samples < 10 and not any(
            client.get(f"/v1/fine_tuning/jobs/{j}").json()["status"] == "succeeded" for j in (a, b)
        ):
            assert client.get(f"/v1/fine_tuning/jobs/{c}").json()["status"] == "queued"
            samples += 1
            time.sleep(0.3)
        assert samples >= 3, "A or B ended before C's wait could be seen"

        for job_id in (a, b, c):
            assert server.wait_until_terminal(client, job_id)["status"] == "succeeded"
        first_ends = min(events_of(server, client, j, "metrics")[-1]["time"] for j in (a, b))
        c_starts = events_of(server, client, c, "metrics")[0]["time"]
        assert c_starts > first_ends, "C started before A or B left"
        c_sizes = {m["pack_size"] for m in events_of(server, client, c, "metrics")}
        assert max(c_sizes) <= 2, c_sizes  # never three on the host

        # What the host measured per membership, beside admission's estimate, via the API.
        # (The store keeps OpenAI's event types: the host's "memory" events read as messages.)
        memberships = {
            tuple(m["members"]): m
            for j in (a, b, c)
            for m in events_of(server, client, j, "message")
            if "measured_peak_bytes" in (m or {})
        }
        for members, m in memberships.items():
            ratio = m["measured_peak_bytes"] / m["estimate_bytes"]
            print(
                f"memory per rank {len(members)} job(s): estimate {m['estimate_bytes']} B, "
                f"measured {m['measured_peak_bytes']} B ({ratio:.3f})"
            )
            assert m["estimate_bytes"] <= budget
            assert 0.8 <= ratio <= 1.2, (members, m)
        assert {a, b} in [set(members) for members in memberships]
        assert any(c in members for members in memberships)


def test_a_job_no_host_could_hold_is_refused_when_submitted(
    budget_server: LorafleetServer, tiny_base: Path
) -> None:
    _, budget, _ = budget_for_two(tiny_base)
    with budget_server.client() as client:
        file_id = upload(client, [json.loads(line) for line in long_rows(8).splitlines()])
        before = client.get("/v1/fine_tuning/jobs").json()["data"]
        response = client.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": "tiny-llama",
                "training_file": file_id,
                "resources": {"num_workers": WORKERS},
                "hyperparameters": {"batch_size": 64},
                "training": {"precision": "fp32", "max_seq_len": 2048},
            },
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "training.max_seq_len"
        assert "estimated" in error["message"] and f"{budget:,} bytes" in error["message"]
        assert client.get("/v1/fine_tuning/jobs").json()["data"] == before  # nothing stored


def test_the_budget_comes_from_the_cluster_for_a_base_on_s3(
    server: LorafleetServer, ray_address: str
) -> None:
    """With LORAFLEET_HOST_MEMORY_BYTES unset, serve sizes hosts from what Ray says of its
    nodes (a CPU node's memory over its CPUs, less the reserve) and reads an s3:// base's
    sizes from the store: a job bigger than that is refused, a small one is taken."""
    from orchestrator.scheduling.memory_budget import RankBudgets
    from orchestrator.scheduling.ray_nodes import ray_node_memory
    from orchestrator.settings import Settings

    largest = RankBudgets(Settings(), tuple(ray_node_memory())).largest(use_gpu=False)
    assert largest is not None and largest > 0
    with server.client() as client:
        file_id = upload(client, [json.loads(line) for line in long_rows(9).splitlines()])

        def create(max_seq_len: int, batch_size: int) -> Any:
            return client.post(
                "/v1/fine_tuning/jobs",
                json={
                    "model": "tiny-llama-s3",
                    "training_file": file_id,
                    "resources": {"num_workers": WORKERS},
                    "hyperparameters": {"batch_size": batch_size, "n_epochs": 1},
                    "training": {"max_seq_len": max_seq_len},
                },
            )

        refused = create(max_seq_len=131_072, batch_size=64)
        assert refused.status_code == 400, refused.text
        message = refused.json()["error"]["message"]
        assert f"{largest:,} bytes per worker" in message, message
        assert "the largest node's memory less the reserve" in message
        taken = create(max_seq_len=64, batch_size=4)
        assert taken.status_code == 200, taken.text
        client.post(f"/v1/fine_tuning/jobs/{taken.json()['id']}/cancel")
