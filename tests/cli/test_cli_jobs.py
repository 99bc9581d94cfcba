"""`lorafleet jobs …` against a real server on real Ray: exit codes, --json, download, and
`jobs watch` across a SIGKILL and restart of the server."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cli.conftest import DATA, lorafleet
from tests.conftest import wait_for_condition
from tests.e2e.conftest import LorafleetServer

pytestmark = pytest.mark.slow


def test_create_watch_succeeds_and_the_download_loads_in_peft(
    server: LorafleetServer, training_file: Path, tiny_base: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    code, out = lorafleet(
        server, "jobs", "create", "--model", "tiny-llama", "--training-file", str(training_file),
        "--epochs", "1", "--batch-size", "2", "--lora-r", "4", "--watch", "--json",
    )  # fmt: skip
    lines = [json.loads(line) for line in out.splitlines()]
    job = lines[-1]
    assert code == 0 and job["status"] == "succeeded", out
    steps = [e["data"]["step"] for e in lines[:-1] if e["type"] == "metrics"]
    assert steps == list(range(1, len(DATA) // 2 + 1))

    code, out = lorafleet(server, "jobs", "download", job["id"], str(tmp_path / "a"), "--json")
    assert code == 0
    assert "adapter_model.safetensors" in json.loads(out)["files"]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "a"
    )
    assert model.peft_config["default"].r == 4

    for args in (["get", job["id"]], ["list"], ["events", job["id"]]):
        code, out = lorafleet(server, "jobs", *args, "--json")
        assert code == 0
        json.loads(out)
    code, out = lorafleet(server, "files", "upload", str(training_file), "--json")
    assert code == 0 and json.loads(out)["id"].startswith("file-")

    # The server's scheduler counted exactly the steps its jobs' events show (this module's
    # server has trained nothing else yet).
    with server.api() as api:
        events = [e for j in api.list_jobs(100) for e in api.events(j["id"])]
    stored = [e for e in events if e["type"] == "metrics"]
    found = {
        s.name: s.value
        for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
        for s in family.samples
        if not s.labels
    }
    assert found["lorafleet_trained_steps_total"] == len(stored) == len(steps)
    assert found["lorafleet_step_seconds_count"] == len(stored)
    assert found["lorafleet_step_seconds_sum"] == pytest.approx(
        sum(e["data"]["step_seconds"] for e in stored)
    )
    assert found["lorafleet_submit_to_first_step_seconds_count"] == 1


def test_exit_codes_for_failed_cancelled_and_bad_input(
    server: LorafleetServer, training_file: Path, tmp_path: Path
) -> None:
    # Failed: every prompt is longer than max_seq_len, so no example keeps a trained token;
    # only the worker's tokenizer can see that, so the job is accepted and fails in training.
    too_long = tmp_path / "too-long.jsonl"
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    too_long.write_text(
        "\n".join(
            json.dumps({"prompt": "".join(rng.choices(letters, k=6000)), "completion": "ok"})
            for _ in range(4)
        )
    )
    code, job_id = lorafleet(
        server, "jobs", "create", "--model", "tiny-llama", "--training-file", str(too_long)
    )
    job_id = job_id.strip()
    code, out = lorafleet(server, "jobs", "watch", job_id)
    assert code == 1, out
    assert "failed" in out

    code, job_id = lorafleet(
        server, "jobs", "create", "--model", "tiny-llama", "--training-file", str(training_file),
        "--epochs", "50",
    )  # fmt: skip
    assert code == 0
    assert lorafleet(server, "jobs", "cancel", job_id.strip())[0] == 0
    assert lorafleet(server, "jobs", "watch", job_id.strip())[0] == 3

    code, _ = lorafleet(
        server, "jobs", "create", "--model", "no-such-model", "--training-file", str(training_file)
    )
    assert code == 2
    assert lorafleet(server, "jobs", "get", "ftjob-nope")[0] == 2


@pytest.mark.faults
def test_watch_survives_a_server_restart_without_showing_a_step_twice(
    server: LorafleetServer, training_file: Path, tmp_path: Path
) -> None:
    with server.api() as api:
        file_id = api.upload_file(training_file)["id"]
        job = api.create_job(
            {
                "model": "tiny-llama",
                "training_file": file_id,
                "hyperparameters": {"n_epochs": 12, "batch_size": 2},
            }
        )
        out = tmp_path / "watch.jsonl"
        with open(out, "wb") as sink:
            watch = subprocess.Popen(
                [sys.executable, "-m", "api.cli", "jobs", "watch", job["id"], "--json"],
                env={**os.environ, "LORAFLEET_URL": server.url},
                stdout=sink,
            )

        def steps_seen() -> list[int]:
            lines = [json.loads(line) for line in out.read_text().splitlines() if line]
            return [e["data"]["step"] for e in lines if e.get("type") == "metrics"]

        wait_for_condition(lambda: len(steps_seen()) >= 3, timeout=400, what="steps")
        server.kill()
        time.sleep(2)  # the watcher sees the server gone and retries meanwhile
        server.start(same_port=True)
        assert watch.wait(timeout=300) == 0
        steps = steps_seen()
        assert steps == sorted(set(steps)), steps
        assert steps[-1] == 12 * len(DATA) // 2
        events = [json.loads(line) for line in out.read_text().splitlines()][:-1]
        assert len({e["id"] for e in events}) == len(events)
        assert api.get_job(job["id"])["status"] == "succeeded"
