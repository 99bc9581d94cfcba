"""Exact packing in bf16, as a user sees it through the public API (CPU, 2 workers, ZeRO-3):
two different jobs (different lengths, formats, ranks and target modules) trained in one
pack on a warm pack host give the same adapters, bit for bit, as the same two jobs trained
alone (`packing: false`, each on a host of its own). The job object
and its "training started" event name bf16."""

from __future__ import annotations

import io
import tarfile
from typing import Any

import httpx
import pytest
import torch

from tests.e2e.conftest import LorafleetServer
from tests.e2e.test_training_job import started, submit, upload

pytestmark = [pytest.mark.slow, pytest.mark.long]

SHORT = [{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a in range(4) for b in range(4)]
CHAT = [
    {
        "messages": [
            {"role": "user", "content": f"shout {w}"},
            {"role": "assistant", "content": w.upper()},
        ]
    }
    for w in ("apple", "green", "light", "music", "paper", "ocean", "field", "piano")
]
JOBS: list[dict[str, Any]] = [
    {"data": SHORT, "seed": 1, "lora": {"r": 4, "alpha": 8}, "epochs": 2, "lr": 1e-2},
    {
        "data": CHAT,
        "seed": 3,
        "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        "epochs": 2,
        "lr": 2e-2,
    },
]


def adapter_tensors(client: httpx.Client, job_id: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    archive = client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", follow_redirects=True)
    assert archive.status_code == 200, archive.text
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        member = tar.extractfile("adapter_model.safetensors")
        assert member is not None
        return load(member.read())


def test_bf16_jobs_packed_equal_the_same_jobs_alone_bit_for_bit(
    server: LorafleetServer,
) -> None:
    with server.client() as client:
        files = [upload(client, job["data"]) for job in JOBS]

        def submit_all(packing: bool) -> list[dict[str, Any]]:
            return [
                submit(
                    client,
                    model="tiny-llama",
                    training_file=file_id,
                    seed=job["seed"],
                    hyperparameters={"n_epochs": job["epochs"], "batch_size": 4},
                    lora=job["lora"],
                    training={
                        "precision": "bf16",
                        "learning_rate": job["lr"],
                        "max_seq_len": 64,
                        "packing": packing,
                    },
                    resources={"num_workers": 2},
                )
                for job, file_id in zip(JOBS, files, strict=True)
            ]

        packed = submit_all(packing=True)
        alone = submit_all(packing=False)
        for job in packed + alone:
            assert job["training"]["precision"] == "bf16"
            final = server.wait_until_terminal(client, job["id"], timeout=600)
            assert final["status"] == "succeeded", final
        hosts = {started(server, client, j["id"])["run_id"] for j in packed}
        assert len(hosts) == 1 and next(iter(hosts)).startswith("host-"), hosts
        own = {started(server, client, j["id"])["run_id"] for j in alone}
        assert len(own) == len(JOBS) and not own & hosts, own  # a host each, not the pack's
        for job in alone:
            sizes = {
                e["data"]["pack_size"]
                for e in server.all_events(client, job["id"])
                if e["type"] == "metrics"
            }
            assert sizes == {1}, sizes
        for job in packed:
            events = server.all_events(client, job["id"])
            begun = next(e for e in events if "precision" in (e["data"] or {}))
            assert begun["data"]["precision"] == "bf16"
            # Packed for real: each job trained steps beside the others (jobs that arrive
            # together start in one pack on a warm host).
            sizes = [e["data"]["pack_size"] for e in events if e["type"] == "metrics"]
            assert max(sizes) >= 2, sizes
        for ours, theirs in zip(packed, alone, strict=True):
            mine, reference = (
                adapter_tensors(client, ours["id"]),
                adapter_tensors(client, theirs["id"]),
            )
            assert mine.keys() == reference.keys() and mine
            worst = max((mine[k] - reference[k]).abs().max().item() for k in mine)
            assert worst == 0.0, f"{ours['id']}: packed differs from alone by {worst}"
            assert any(t.abs().max() > 0 for k, t in mine.items() if "lora_B" in k)
