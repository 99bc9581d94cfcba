"""End to end over HTTP: a trained job's merged weights (final adapter at scale 0.5, a
checkpoint at scale 1) merged by a Ray task into S3 (radosgw), downloaded from presigned URLs
and loaded by transformers with peft's logits; then `models.delete` through the openai SDK
leaves nothing of the model in the store and its downloads answer 404."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from openai import OpenAI

from tests.cli.conftest import lorafleet
from tests.conftest import wait_for_condition
from tests.e2e.conftest import LorafleetServer
from tests.e2e.test_training_job import started, submit, upload

pytestmark = [pytest.mark.slow, pytest.mark.long]

DATA = [{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a in range(4) for b in range(2)]
PROMPT = torch.tensor([[1, 5, 9, 42, 7, 100]])


def merged(client: httpx.Client, path: str, scale: float) -> dict[str, Any]:
    """Asks until the merge is listed: 202 (queued, running) then 200."""
    answer: dict[str, Any] = {}

    def ready() -> bool:
        nonlocal answer
        response = client.get(path, params={"scale": scale})
        assert response.status_code in (200, 202), response.text
        answer = response.json()
        return response.status_code == 200

    first = client.get(path, params={"scale": scale})
    assert first.status_code == 202 and first.json()["status"] in ("queued", "running")
    wait_for_condition(ready, timeout=180, interval=0.5, what=f"{path} at {scale}")
    return answer


def download(listing: dict[str, Any], folder: Path) -> Path:
    for item in listing["files"]:
        data = httpx.get(item["url"], timeout=30).content  # presigned: no API key needed
        assert hashlib.sha256(data).hexdigest() == item["sha256"] and len(data) == item["size"]
        (folder / item["name"]).parent.mkdir(parents=True, exist_ok=True)
        (folder / item["name"]).write_bytes(data)
    return folder


def logits_of(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(PROMPT).logits


def peft_logits(base: Path, adapter: Path, scale: float) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    for module in model.modules():
        if hasattr(module, "scale_layer") and hasattr(module, "lora_A"):
            module.scale_layer(scale)
    with torch.no_grad():
        return model(PROMPT).logits


def test_merged_weights_then_the_model_deleted_through_the_sdk(
    server: LorafleetServer, tiny_base: Path, tmp_path: Path
) -> None:
    assert server.s3 is not None
    s3 = server.s3.client()
    with server.client() as client:
        job = submit(
            client,
            model="tiny-llama",
            training_file=upload(client, DATA),
            suffix="merge",
            seed=5,
            hyperparameters={"n_epochs": 2, "batch_size": 4},
            lora={"r": 4, "alpha": 8, "target_modules": "all-linear"},
            training={"learning_rate": 2e-2, "max_seq_len": 32},
            resources={"num_workers": 2},
        )
        job = server.wait_until_terminal(client, job["id"])
        assert job["status"] == "succeeded", job
        base_url = f"/v1/fine_tuning/jobs/{job['id']}"

        final = merged(client, f"{base_url}/merged", 0.5)
        assert final["checkpoint"] == "final" and final["scale"] == 0.5
        assert all(server.s3.endpoint_url in f["url"] for f in final["files"])
        merged_final = download(final, tmp_path / "final")

        sdk = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        checkpoints = sdk.fine_tuning.jobs.checkpoints.list(job["id"]).data
        [epoch] = [c for c in checkpoints if c.step_number == 2]  # the first epoch's end
        # The CLI waits for this merge (202s), then downloads it, checking each sha256.
        merged_epoch = tmp_path / "epoch"
        code, out = lorafleet(
            server, "jobs", "download", job["id"], str(merged_epoch), "--merged", "--scale",
            "1", "--checkpoint", epoch.id, "--json",
        )  # fmt: skip
        assert code == 0, out
        assert "config.json" in json.loads(out)["files"]

        # The adapters as trained, from the store, for peft to apply.
        attempt = started(server, client, job["id"])["attempt"]
        for name, prefix in (
            ("adapter", f"lorafleet/adapters/default/{job['id']}/attempt-{attempt}/"),
            (
                "epoch-adapter",
                f"lorafleet/runs/default/{job['id']}/attempt-{attempt}/checkpoints/step-2/",
            ),
        ):
            for file in ("adapter_config.json", "adapter_model.safetensors"):
                body = s3.get_object(Bucket=server.bucket, Key=prefix + file)["Body"].read()
                (tmp_path / name).mkdir(exist_ok=True)
                (tmp_path / name / file).write_bytes(body)
        for folder, adapter, scale in (
            (merged_final, tmp_path / "adapter", 0.5),
            (merged_epoch, tmp_path / "epoch-adapter", 1.0),
        ):
            difference = (logits_of(folder) - peft_logits(tiny_base, adapter, scale)).abs().max()
            assert difference.item() <= 1e-4, (folder, difference)

        deleted = sdk.models.delete(job["fine_tuned_model"])
        assert deleted.deleted and deleted.id == job["fine_tuned_model"]
        assert client.get(f"{base_url}/adapter").status_code == 404
        assert client.get(f"{base_url}/merged", params={"scale": 0.5}).status_code == 404
        assert client.get(base_url).json()["status"] == "succeeded"  # the job stays
        for root in ("adapters", "runs", "merged"):
            listed = s3.list_objects_v2(
                Bucket=server.bucket, Prefix=f"lorafleet/{root}/default/{job['id']}/"
            )
            assert listed.get("KeyCount", 0) == 0, (root, listed.get("Contents"))
        with pytest.raises(Exception, match="404|not found|No model"):
            sdk.models.delete(job["fine_tuned_model"])
