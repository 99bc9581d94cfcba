"""Pause, resume and drain on a real server and real pack hosts (Ray, DeepSpeed ZeRO-3, 2
workers), through the official `openai` SDK: three jobs share a host; one is paused (its slot
freed), then the host is drained with the other two on it: they continue on a new host from
the step they were drained at; the paused one is resumed there. None spends an attempt, and
the paused job's adapter and a drained one's equal a twin's trained after the drain,
uninterrupted (fp32, ≤ 1e-5)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from orchestrator.scheduling.drain import drain
from orchestrator.settings import Settings
from tests.conftest import wait_for_condition
from tests.e2e.conftest import LorafleetServer, running_server, shared_ray_env
from tests.e2e.test_bf16_packing_over_http import adapter_tensors
from tests.e2e.test_training_job import DATA, upload

# A long comparison (four jobs, two host starts): the later stage, not the main one.
pytestmark = [pytest.mark.slow, pytest.mark.long]


@pytest.fixture(scope="module")
def pause_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, ray_address: str
) -> Iterator[LorafleetServer]:
    folder = tmp_path_factory.mktemp("pause-server")
    env = shared_ray_env(
        folder, tiny_base, ray_address, host_idle_seconds="30", max_concurrent_runs="2"
    )
    with running_server(env, folder) as server:
        yield server


def job_events(server: LorafleetServer, client: Any, job_id: str) -> list[dict[str, Any]]:
    return server.all_events(client, job_id)


def metric_steps(events: list[dict[str, Any]]) -> list[int]:
    return [e["data"]["step"] for e in events if e["type"] == "metrics"]


def hosts_of(events: list[dict[str, Any]]) -> list[str]:
    return [e["data"]["run_id"] for e in events if "run_id" in (e["data"] or {})]


def test_pause_resume_and_drain_continue_exactly_with_no_attempt_spent(
    pause_server: LorafleetServer,
) -> None:
    server = pause_server
    sdk = OpenAI(base_url=f"{server.url}/v1", api_key="unused-until-keys-exist", max_retries=0)
    with server.client() as client:
        file_id = upload(client, DATA)

        def create(seed: int) -> str:
            return sdk.fine_tuning.jobs.create(
                model="tiny-llama",
                training_file=file_id,
                seed=seed,
                method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 24}}},
                extra_body={"resources": {"num_workers": 2}, "training": {"precision": "fp32"}},
            ).id

        paused, twin, other = create(7), create(7), create(8)
        # Not running yet: a pause is refused, naming the job's state.
        with pytest.raises(openai.ConflictError) as early:
            sdk.fine_tuning.jobs.pause(other)
        assert re.search(r"is (validating_files|queued); only a running job", early.value.message)

        def stepping(job_id: str) -> bool:
            return bool(metric_steps(job_events(server, client, job_id)))

        for job_id in (paused, twin, other):
            wait_for_condition(lambda j=job_id: stepping(j), timeout=300, what=f"{job_id} steps")
        first_host = hosts_of(job_events(server, client, paused))[-1]
        assert all(hosts_of(job_events(server, client, j))[-1] == first_host for j in (twin, other))

        # Pause: checkpointed at its next step boundary, its slot freed.
        assert sdk.fine_tuning.jobs.pause(paused).status == "pausing"
        wait_for_condition(
            lambda: sdk.fine_tuning.jobs.retrieve(paused).status == "paused",
            timeout=60,
            what="the pause",
        )
        with pytest.raises(openai.ConflictError) as again:
            sdk.fine_tuning.jobs.pause(paused)
        assert "is paused; only a running job can be paused" in again.value.message

        # Drain the host with the two others on it: both are handed back and go on elsewhere.
        namespace = server.namespace
        settings = Settings(ray_namespace=namespace, data_dir=server.log.parent / "state")
        assert drain(first_host, settings) == [first_host]
        for job_id in (twin, other):
            wait_for_condition(
                lambda j=job_id: any(
                    "Drained from pack host" in e["message"] for e in job_events(server, client, j)
                ),
                timeout=60,
                what=f"{job_id} handed back",
            )
        assert sdk.fine_tuning.jobs.resume(paused).status == "queued"
        with pytest.raises(openai.ConflictError) as not_paused:
            sdk.fine_tuning.jobs.resume(paused)
        assert "only a paused job can be resumed" in not_paused.value.message
        alone = create(7)  # the uninterrupted twin: it starts after the drain

        for job_id in (paused, twin, other, alone):
            ended = server.wait_until_terminal(client, job_id, timeout=300)
            assert ended["status"] == "succeeded", ended
        with pytest.raises(openai.ConflictError) as done:
            sdk.fine_tuning.jobs.pause(twin)
        assert "is succeeded; only a running job can be paused" in done.value.message

        for job_id, why in ((paused, "Paused"), (twin, "Drained"), (other, "Drained")):
            events = job_events(server, client, job_id)
            messages = [e["message"] for e in events]
            handed = [m for m in messages if re.match(rf"{why}.* at step \d+; its slot is free", m)]
            assert len(handed) == 1, messages
            step = int(re.search(r"at step (\d+);", handed[0]).group(1))  # type: ignore[union-attr]
            # It went on from exactly that step: no step lost, none trained twice.
            steps = metric_steps(events)
            assert steps == list(range(1, steps[-1] + 1)) and 0 < step < steps[-1], steps
            resumed = [
                e["data"]["resumed_from_step"]
                for e in events
                if "resumed_from_step" in (e["data"] or {})
            ]
            assert resumed[-1] == step, resumed
            # No attempt spent: each claim after the hand-back is attempt 1 again.
            attempts = [e["data"]["attempt"] for e in events if "run_id" in (e["data"] or {})]
            assert len(attempts) >= 2 and set(attempts) == {1}, attempts
            # No job went back to the drained host.
            assert hosts_of(events)[-1] != first_host

        assert first_host not in hosts_of(job_events(server, client, alone))
        reference = adapter_tensors(client, alone)
        for job_id, how in ((paused, "paused-then-resumed"), (twin, "drained")):
            mine = adapter_tensors(client, job_id)
            assert mine.keys() == reference.keys() and mine
            worst = max((mine[k] - reference[k]).abs().max().item() for k in mine)
            print(f"{how} vs uninterrupted twin: largest difference {worst:.2e}")
            assert worst <= 1e-5, (how, worst)
