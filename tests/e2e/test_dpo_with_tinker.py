"""A DPO job, a supervised job and a Tinker client on one pack host at once (issue 21: "DPO
jobs pack with supervised jobs and Tinker clients on one base"), through the public
interfaces: the jobs through the official `openai` SDK, the client through the official
`tinker` SDK, against a real `lorafleet serve` with one warm host of the tiny Llama (fp32).

The client's `forward_backward` calls ride in the pack's steps (the DPO job's reference pass
first, then one forward per padded width: the DPO job's pairs with the client's rows, the
supervised job's shorter rows in their own), and each member equals the same work with the
host to itself: the jobs' published adapters bit for bit, the client's per-step losses and
saved weights bit for bit."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from openai import OpenAI
from safetensors.torch import load_file

from tests.conftest import wait_for_condition
from tests.e2e.conftest import LorafleetServer, running_server, shared_ray_env, tinker_key
from tests.e2e.test_dpo_over_http import SUMS, TRAIN_WORDS, pairs
from tests.e2e.test_tinker_sdk import STEPS_SHARED, _client_script, assert_same_final_weights
from tests.e2e.test_training_job import started

# A later stage of make test (~30 s on 2 quiet cores): a serve and its warm host, each job
# twice (packed, then alone) and the client twice.
pytestmark = [pytest.mark.slow, pytest.mark.long]

# The DPO job's pairs are 29-34 tokens (a batch of them padded to 48 but for the rare one of
# only the shortest): the client's rows, 40 and 21 tokens, are padded to 48 too, so they share
# the forward of the DPO job's rows. The supervised job's (~10 tokens) go in one of their own.
CLIENT_LENGTHS = (40, 21)
# Both jobs train from before the client's first call to after its last: 40 and 42 steps.
DPO_HYPERPARAMETERS: dict[str, Any] = {"beta": 0.5, "n_epochs": 10, "batch_size": 4}
SFT_HYPERPARAMETERS: dict[str, Any] = {"n_epochs": 14, "batch_size": 4}
# One worker keeps CI short; DPO_TINKER_TEST_WORKERS=2 runs the same over ZeRO-3 ranks.
WORKERS = int(os.environ.get("DPO_TINKER_TEST_WORKERS", "1"))


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, ray_address: str
) -> Iterator[tuple[LorafleetServer, str]]:
    folder = tmp_path_factory.mktemp("dpo-tinker-server")
    env = shared_ray_env(
        folder, tiny_base, ray_address, warm_hosts="1", default_num_workers=str(WORKERS)
    )
    key = tinker_key(env)
    with running_server(env, folder, api_key=key) as server:
        yield server, key


def client_data() -> list[Any]:
    from tinker import types

    return [
        types.Datum(
            model_input=types.ModelInput.from_ints([7 + (5 * i) % 300 for i in range(n)]),
            loss_fn_inputs={
                "target_tokens": [7 + (5 * i + 5) % 300 for i in range(n)],
                "weights": [0.0] * 3 + [1.0] * (n - 3),
            },
        )
        for n in CLIENT_LENGTHS
    ]


def run_client(server: LorafleetServer, key: str) -> tuple[str, list[float]]:
    """STEPS_SHARED steps of forward_backward (cross_entropy) + optim_step, then
    save_state("final"), from a session of its own: (model id, per-step losses)."""
    import tinker

    service = tinker.ServiceClient(base_url=server.url, api_key=key)
    try:
        return _client_script(service, 21, "cross_entropy", client_data(), None)
    finally:
        service.close("success").result()


def published_adapter(client: httpx.Client, job_id: str, folder: Path) -> dict[str, torch.Tensor]:
    archive = client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter")
    assert archive.status_code == 200, archive.text
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        tar.extractall(folder / job_id, filter="data")
    [found] = (folder / job_id).rglob("adapter_model.safetensors")
    return load_file(found)


def test_a_dpo_job_a_supervised_job_and_a_tinker_client_on_one_host_equal_each_alone(
    server: tuple[LorafleetServer, str], tmp_path: Path
) -> None:
    serve, key = server
    sdk = OpenAI(base_url=f"{serve.url}/v1", api_key=key, max_retries=0)
    files = {
        name: sdk.files.create(
            file=(f"{name}.jsonl", io.BytesIO("\n".join(json.dumps(r) for r in rows).encode())),
            purpose="fine-tune",
        ).id
        for name, rows in (("pairs", pairs(TRAIN_WORDS)), ("sums", SUMS))
    }

    def dpo_job() -> str:
        return sdk.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file=files["pairs"],
            seed=4,
            method={"type": "dpo", "dpo": {"hyperparameters": DPO_HYPERPARAMETERS}},
            extra_body={
                "lora": {"r": 4, "alpha": 8},
                "training": {"learning_rate": 2e-2, "max_seq_len": 48},
            },
        ).id

    def supervised_job() -> str:
        return sdk.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file=files["sums"],
            seed=6,
            method={"type": "supervised", "supervised": {"hyperparameters": SFT_HYPERPARAMETERS}},
            extra_body={"training": {"max_seq_len": 48}},
        ).id

    alone_model, alone_losses = run_client(serve, key)  # the warm host to itself

    with serve.client() as http:
        jobs = {"dpo": dpo_job(), "sft": supervised_job()}
        wait_for_condition(  # both jobs train before the client's first call
            lambda: all(
                any(e["type"] == "metrics" for e in serve.all_events(http, job))
                for job in jobs.values()
            ),
            timeout=120,
            interval=0.1,
            what="both jobs' first steps",
        )
        shared_model, shared_losses = run_client(serve, key)
        for job in jobs.values():  # ... and after its last
            status = http.get(f"/v1/fine_tuning/jobs/{job}").json()["status"]
            assert status == "running", f"{job} ended before the client: make it longer"
        for job in jobs.values():
            assert serve.wait_until_terminal(http, job)["status"] == "succeeded"
        hosts = {started(serve, http, job)["run_id"] for job in jobs.values()}
        events = serve.all_events(http, jobs["dpo"])
        metrics = [e["data"] for e in events if e["type"] == "metrics"]

        adapters = {name: published_adapter(http, job, tmp_path) for name, job in jobs.items()}
        for name, again in (("dpo", dpo_job), ("sft", supervised_job)):
            alone = again()  # the same job again, with the host to itself
            assert serve.wait_until_terminal(http, alone)["status"] == "succeeded"
            solo = published_adapter(http, alone, tmp_path)
            # Each job's published adapter equals the same job trained alone, bit for bit.
            assert adapters[name].keys() == solo.keys() and solo, name
            for tensor_name, tensor in adapters[name].items():
                assert torch.equal(tensor, solo[tensor_name]), (name, tensor_name)

    # One host: both jobs' run and the client's model (the Tinker model's placement).
    data_dir = Path(serve.env["LORAFLEET_DATA_DIR"])
    with sqlite3.connect(data_dir / "lorafleet.db") as db:
        [(model_host,)] = db.execute(
            "SELECT host_id FROM tinker_models WHERE id = ?", (shared_model,)
        ).fetchall()
    assert hosts == {model_host} and model_host.startswith("host-")

    # Each forward_backward rode one of the pack's steps: that step's device time is split
    # with the client by tokens (core.usage), so the DPO job's share of it is its tokens'
    # share of the pack's (both jobs') and the client's.
    rider_tokens = sum(CLIENT_LENGTHS)
    rode = []
    for m in metrics:
        share = m["device_seconds"] / (m["step_seconds"] * WORKERS)
        pack_tokens = m["pack_tokens_per_second"] * m["step_seconds"]
        if share == pytest.approx(m["step_tokens"] / pack_tokens, rel=1e-9):
            continue  # a step of the jobs alone
        assert share == pytest.approx(m["step_tokens"] / (pack_tokens + rider_tokens), rel=1e-9)
        rode.append(m)
    assert len(rode) == STEPS_SHARED, [m["step"] for m in rode]
    assert all(m["pack_size"] == 2 for m in rode)  # all three members in one step

    # The client: its losses and its saved weights equal the same calls on a host of its own.
    assert shared_losses == alone_losses
    assert_same_final_weights(data_dir, alone_model, shared_model, "the client")
