"""End to end over HTTP: REST → scheduler → Ray Train (2 workers) → DeepSpeed ZeRO-3 →
PEFT adapter in S3 (radosgw) → downloaded, loaded with peft, and it changes the model."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from core.host_protocol import host_actor_name
from core.object_keys import adapter_key
from tests.conftest import wait_for_condition
from tests.e2e.conftest import LorafleetServer

pytestmark = pytest.mark.slow

DATA_PAIRS = [(a, b) for a in range(6) for b in range(4)]
DATA = [{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a, b in DATA_PAIRS]


def upload(client: httpx.Client, records: list[dict[str, Any]]) -> str:
    body = "\n".join(json.dumps(r) for r in records).encode()
    response = client.post(
        "/v1/files", files={"file": ("add.jsonl", body)}, data={"purpose": "fine-tune"}
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def submit(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/fine_tuning/jobs", json=fields)
    assert response.status_code == 200, response.text
    return dict(response.json())


def started(server: LorafleetServer, client: httpx.Client, job_id: str) -> dict[str, Any]:
    """The data of the job's newest "started" event: its run id and attempt number."""
    # In the default mode a run id is a pack host's id ("host-…"), else a run's ("run-…").
    runs = [e["data"] for e in server.all_events(client, job_id) if "run_id" in (e["data"] or {})]
    assert runs, f"{job_id} never started"
    return dict(runs[-1])


def transformers_cosine(lr: float, warmup: int, total: int) -> list[float]:
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    rates = []
    for _ in range(total):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return rates


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_a_job_trains_a_real_adapter_end_to_end(
    server: LorafleetServer, tiny_base: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base_before = folder_digest(tiny_base)
    with server.client() as client:
        submitted_at = time.monotonic()
        job = submit(
            client,
            model="tiny-llama",
            training_file=upload(client, DATA),
            suffix="add",
            seed=3,
            hyperparameters={"n_epochs": 2, "batch_size": 4},
            lora={"r": 4, "alpha": 8, "target_modules": "all-linear"},
            training={
                "learning_rate": 1e-2,
                "max_seq_len": 32,
                "lr_scheduler": "cosine",
                "warmup_ratio": 0.2,
            },
            resources={"num_workers": 2},
        )
        job = server.wait_until_terminal(client, job["id"])
        wall = time.monotonic() - submitted_at
        assert job["status"] == "succeeded", job
        assert job["fine_tuned_model"] == f"ft:tiny-llama:add:{job['id']}"
        assert job["trained_tokens"] > 0

        events = server.all_events(client, job["id"])
        statuses = [e["data"]["status"] for e in events if e["data"] and "status" in e["data"]]
        assert statuses == ["validating_files", "queued", "running", "succeeded"]
        metrics = [e["data"] for e in events if e["type"] == "metrics"]
        total = metrics[0]["total_steps"]
        assert total == 2 * len(DATA) // 4
        assert [m["step"] for m in metrics] == list(range(1, total + 1))
        assert all(m["train_loss"] > 0 and m["tokens_per_second"] > 0 for m in metrics)
        assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
        # Each step's rate is transformers' cosine schedule's, warm-up ceil(0.2·12) = 3.
        assert [m["learning_rate"] for m in metrics] == transformers_cosine(1e-2, 3, total)
        training_s = sum(m["step_seconds"] for m in metrics)
        print(f"\nsubmit→succeeded {wall:.1f} s; training steps {training_s:.2f} s")

        # ZeRO-3: each of the 2 ranks holds about half of every frozen base weight.
        [partitioning] = [
            e["data"]["partitioning"] for e in events if "partitioning" in (e["data"] or {})
        ]
        assert sorted(p["rank"] for p in partitioning) == [0, 1]
        for rank in partitioning:
            assert 0.45 <= rank["min_fraction"] <= rank["max_fraction"] <= 0.55, rank
            assert rank["base_params_requiring_grad"] == 0

        # From S3 the download is a redirect to a short-lived presigned URL on the store.
        redirect = client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter")
        assert redirect.status_code == 307
        assert server.s3 is not None
        assert redirect.headers["location"].startswith(server.s3.endpoint_url)
        attempt = started(server, client, job["id"])["attempt"]
        archive = client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter", follow_redirects=True)
        assert archive.status_code == 200 and archive.content[:2] == b"\x1f\x8b"  # gzip
    adapter = tmp_path / "adapter"
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        tar.extractall(adapter, filter="data")

    # The manifest matches the downloaded files and the objects in S3 themselves.
    manifest = json.loads((adapter / "manifest.json").read_text())["files"]
    assert set(manifest) == {"adapter_config.json", "adapter_model.safetensors"}
    s3 = server.s3.client()
    for name, entry in manifest.items():
        local = (adapter / name).read_bytes()
        key = "lorafleet/" + adapter_key("default", job["id"], attempt, name)
        stored = s3.get_object(Bucket=server.bucket, Key=key)["Body"].read()
        for data in (local, stored):
            assert hashlib.sha256(data).hexdigest() == entry["sha256"]
            assert len(data) == entry["size"]

    # Only LoRA factors of linear layers, none empty (ZeRO-3 shards were gathered).
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors and all(("lora_A" in k or "lora_B" in k) for k in tensors)
    assert not any("lm_head" in k or "embed" in k for k in tensors)
    for key, tensor in tensors.items():
        assert tensor.numel() > 0, key
        assert (tensor.shape[0] if "lora_A" in key else tensor.shape[1]) == 4
    assert any(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (
        4,
        8,
        "tiny-llama",
    )

    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    inputs = torch.tensor([[0, 10, 20, 30, 40, 50]])
    with torch.no_grad():
        base_logits = base(inputs).logits
        tuned = PeftModel.from_pretrained(base, adapter)
        tuned_logits = tuned(inputs).logits
        merged_logits = tuned.merge_and_unload()(inputs).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-3
    assert torch.allclose(merged_logits, tuned_logits, atol=1e-4)
    assert folder_digest(tiny_base) == base_before


def test_cancelling_a_running_job_stops_its_ray_run(server: LorafleetServer) -> None:
    import ray

    with server.client() as client:
        job = submit(
            client,
            model="tiny-llama-s3",  # loaded from S3 by the workers
            training_file=upload(client, DATA),
            hyperparameters={"n_epochs": 100, "batch_size": 4},
            resources={"num_workers": 2},
        )
        job_id = job["id"]

        def training() -> bool:
            page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
            return any(e["type"] == "metrics" for e in page)

        wait_for_condition(training, timeout=300, interval=0.5, what="the first training step")
        # While it runs, the job says when it should end (stored with its steps' events).
        running = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        assert running["status"] == "running"
        assert running["estimated_finish"] >= running["created_at"], running
        # Actors are named by pack host, not by job: the job's host is the run id of its
        # "started" event (every job trains on a pack host).
        host_id = started(server, client, job_id)["run_id"]
        assert host_id.startswith("host-"), host_id
        run_name = host_actor_name(host_id)
        host: Any = ray.get_actor(run_name, namespace=server.namespace)  # alive while it trains
        report: dict[str, Any] = ray.get(host.poll.remote({}))
        assert job_id in report["jobs"]
        cancelling = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
        assert cancelling.status_code == 200
        assert cancelling.json()["status"] in ("cancelling", "cancelled")
        job = server.wait_until_terminal(client, job_id, timeout=120)
        assert job["status"] == "cancelled"
        assert job["estimated_finish"] is None  # only while it runs

        # The job's slot is released; the host, left with no job, ends after its idle time
        # (5 s in this fixture), is reaped and gives its CPUs back.
        wait_for_condition(
            lambda: host_gone_or_without(host, job_id), timeout=60, what="the slot's release"
        )

        def run_gone() -> bool:
            try:
                ray.get_actor(run_name, namespace=server.namespace)
            except ValueError:
                return True
            return False

        wait_for_condition(run_gone, timeout=60, what=f"{run_name} to be reaped")
        wait_for_condition(
            lambda: ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"],
            timeout=60,
            what="the run's CPUs to be released",
        )
        events = server.all_events(client, job_id)
        steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
        assert steps and max(steps) < 100 * len(DATA) // 4
        time.sleep(1)
        assert server.all_events(client, job_id) == events  # nothing more happens

        # A terminal job never changes again; no adapter was published.
        again = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
        assert again.status_code == 409
        assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json() == job
        assert client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter").status_code == 409
    assert server.s3 is not None
    listed = server.s3.client().list_objects_v2(
        Bucket=server.bucket, Prefix=f"lorafleet/adapters/default/{job_id}/"
    )
    assert listed.get("KeyCount", 0) == 0


def host_gone_or_without(host: Any, job_id: str) -> bool:
    import ray

    try:
        return job_id not in ray.get(host.poll.remote({}), timeout=10)["jobs"]
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return True


def test_a_training_error_fails_only_that_job_with_its_reason(server: LorafleetServer) -> None:
    # Valid JSONL whose every prompt is longer than max_seq_len: the completion is cut off,
    # so no example has a token to train on. Only the worker, which tokenizes with the
    # base's tokenizer, can see that; submission accepts it (unlike a bad target module).
    long_prompt = " ".join(str(n) for n in range(64))
    cut_off = [
        {"prompt": f"{long_prompt} {a}+{b}=", "completion": f"{a + b}"} for a, b in DATA_PAIRS
    ]
    common = {
        "model": "tiny-llama",
        "resources": {"num_workers": 2},
        "training": {"max_seq_len": 16},
        "hyperparameters": {"n_epochs": 1, "batch_size": 4},
    }
    with server.client() as client:
        broken = submit(client, training_file=upload(client, cut_off), **common)
        healthy = submit(client, training_file=upload(client, DATA), **common)
        broken = server.wait_until_terminal(client, broken["id"])
        healthy = server.wait_until_terminal(client, healthy["id"])
        runs = {started(server, client, job["id"])["run_id"] for job in (broken, healthy)}
    assert len(runs) == 1, "both jobs trained in one pack"
    assert broken["status"] == "failed", broken
    assert broken["error"]["code"] == "training_error"
    assert "no example has a trained token within max_seq_len=16" in broken["error"]["message"]
    assert broken["fine_tuned_model"] is None
    # The other job of the pack trained on, to its own adapter.
    assert healthy["status"] == "succeeded", healthy
    assert healthy["fine_tuned_model"] and healthy["error"] is None


def test_a_job_can_start_from_another_jobs_checkpoint(server: LorafleetServer) -> None:
    with server.client() as client:
        file_id = upload(client, DATA)
        common = {"model": "tiny-llama", "training_file": file_id, "resources": {"num_workers": 2}}
        source = submit(
            client,
            **common,
            seed=4,
            lora={"r": 4, "alpha": 8},
            training={"learning_rate": 1e-2},
            hyperparameters={"n_epochs": 3},
        )
        assert server.wait_until_terminal(client, source["id"])["status"] == "succeeded"
        checkpoints = client.get(f"/v1/fine_tuning/jobs/{source['id']}/checkpoints").json()["data"]
        final = checkpoints[0]
        forked = submit(
            client,
            **common,
            seed=4,
            from_checkpoint=final["id"],
            training={"learning_rate": 1e-2},
            hyperparameters={"n_epochs": 1},
        )
        assert forked["lora"]["r"] == 4
        assert server.wait_until_terminal(client, forked["id"])["status"] == "succeeded"

        def first_loss(job_id: str) -> float:
            events = server.all_events(client, job_id)
            return float(next(e["data"]["train_loss"] for e in events if e["type"] == "metrics"))

        messages = [e["message"] for e in server.all_events(client, forked["id"])]
        assert any(m.startswith(f"Started from checkpoint {final['id']}") for m in messages)
        # It starts where the source ended, not from the base.
        assert first_loss(forked["id"]) < first_loss(source["id"]) - 0.05


def test_a_file_with_raw_line_separators_inside_strings_trains(server: LorafleetServer) -> None:
    """U+2028/U+2029/U+0085 are allowed raw inside JSON strings: such a file is accepted
    (JSON Lines splits on \\n only) and the job trains on it to the end."""
    lines = [
        json.dumps(
            {"prompt": f"{a}\u2028+{b}=", "completion": f"{a + b}\u2029"}, ensure_ascii=False
        )
        for a, b in DATA_PAIRS[:8]
    ]
    body = ("\r\n".join(lines) + "\n").encode()
    with server.client() as client:
        uploaded = client.post(
            "/v1/files", files={"file": ("seps.jsonl", body)}, data={"purpose": "fine-tune"}
        )
        assert uploaded.status_code == 200, uploaded.text
        assert uploaded.json()["bytes"] == len(body)
        job = submit(
            client,
            model="tiny-llama",
            training_file=uploaded.json()["id"],
            hyperparameters={"n_epochs": 1, "batch_size": 4},
            training={"max_seq_len": 32},
            resources={"num_workers": 1},
        )
        job = server.wait_until_terminal(client, job["id"])
        assert job["status"] == "succeeded", job
        assert job["trained_tokens"] > 0


# The later stage: it trains to early stopping and a whole-file evaluation (minutes on 2 cores).
@pytest.mark.long
def test_validation_metrics_checkpoints_and_results_file_through_the_openai_sdk(
    server: LorafleetServer,
) -> None:
    """The official SDK, unchanged but for base_url: a job with a validation file has
    `valid_loss` in its events, OpenAI's metric names in its checkpoints, and a results CSV
    in `result_files` that `files.content` returns."""
    import csv

    from openai import OpenAI

    sdk = OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key or "none", max_retries=0)

    def upload_records(name: str, records: list[dict[str, Any]]) -> str:
        body = "\n".join(json.dumps(r) for r in records).encode()
        return sdk.files.create(file=(name, io.BytesIO(body)), purpose="fine-tune").id

    valid = [{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a in (6, 7) for b in range(5)]
    job = sdk.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=upload_records("add.jsonl", DATA),
        validation_file=upload_records("valid.jsonl", valid),
        seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
        extra_body={
            "lora": {"r": 4, "alpha": 8},
            "training": {"learning_rate": 1e-2, "max_seq_len": 32, "n_evals": 3},
            "resources": {"num_workers": 2},
        },
    )
    with server.client() as client:
        assert server.wait_until_terminal(client, job.id)["status"] == "succeeded"
    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=100))  # every page
    metrics: list[dict[str, Any]] = [
        e.data for e in reversed(events) if e.type == "metrics" and isinstance(e.data, dict)
    ]
    total = 2 * len(DATA) // 4  # 12 steps, evaluated on the sample after steps 4, 8 and 12
    validated = [m for m in metrics if "valid_loss" in m]
    assert [m["step"] for m in validated] == [4, 8, 12, 12]
    assert all(m["valid_loss"] > 0 and 0 <= m["valid_mean_token_accuracy"] <= 1 for m in validated)
    assert validated[-1]["full_valid_loss"] > 0  # the whole file at the end (10 rows: 3 chunks)
    steps = [m for m in metrics if "evaluation" not in m]
    assert [m["step"] for m in steps] == list(range(1, total + 1))
    assert all(0 <= m["train_mean_token_accuracy"] <= 1 for m in steps)

    checkpoints = sdk.fine_tuning.jobs.checkpoints.list(job.id).data
    final, periodic = checkpoints[0], checkpoints[1:]
    assert final.step_number == total and periodic
    openai_names = {
        "step",
        "train_loss",
        "train_mean_token_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
        "full_valid_loss",
        "full_valid_mean_token_accuracy",
    }
    assert final.metrics.model_dump(exclude_none=True).keys() == openai_names
    assert final.metrics.full_valid_loss == validated[-1]["full_valid_loss"]
    epoch_end = next(c for c in periodic if c.step_number == total // 2)  # step 6: after step 4's
    assert epoch_end.metrics.valid_loss == validated[0]["valid_loss"]
    assert epoch_end.metrics.train_mean_token_accuracy is not None

    [results_id] = sdk.fine_tuning.jobs.retrieve(job.id).result_files
    assert sdk.files.retrieve(results_id).purpose == "fine-tune-results"
    rows = list(csv.DictReader(io.StringIO(sdk.files.content(results_id).read().decode())))
    assert [int(r["step"]) for r in rows] == list(range(1, total + 1))
    assert list(rows[0]) == [
        "step",
        "train_loss",
        "train_mean_token_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
        "lr",
        "tokens_per_second",
    ]
    assert [int(r["step"]) for r in rows if r["valid_loss"]] == [4, 8, 12]
    assert float(rows[3]["valid_loss"]) == validated[0]["valid_loss"]
