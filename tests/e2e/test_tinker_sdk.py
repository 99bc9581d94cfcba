"""The official `tinker` SDK against a real `lorafleet serve` (issue 21): a script written
for Tinker, unchanged but for base_url and key, trains a LoRA model of the tiny Llama on a
warm pack host, and the protocol's edges (retries, ordering, errors) hold over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for_condition
from tests.e2e.conftest import (
    LorafleetServer,
    running_server,
    shared_ray_env,
    tinker_key,
)

# A later stage of make test (with faults): ~33 s of serve, warm host and 40+ SDK calls.
pytestmark = [pytest.mark.slow, pytest.mark.long]

STEPS = 20
STEPS_SHARED = 4  # each client's steps in the shared-host test


@pytest.fixture(scope="module")
def tinker_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, ray_address: str
) -> Iterator[tuple[LorafleetServer, str]]:
    folder = tmp_path_factory.mktemp("tinker-server")
    env = shared_ray_env(
        folder,
        tiny_base,
        ray_address,
        warm_hosts="1",  # a Tinker model is a slot of a warm host of its base
        # One worker keeps CI short; TINKER_TEST_WORKERS=2 runs the same over ZeRO-3 ranks.
        default_num_workers=os.environ.get("TINKER_TEST_WORKERS", "1"),
    )
    key = tinker_key(env)
    with running_server(env, folder, api_key=key) as server:
        yield server, key


def test_an_sdk_script_trains_on_a_warm_host_and_its_loss_falls(
    tinker_server: tuple[LorafleetServer, str], tiny_base: Path, tmp_path: Path
) -> None:
    import tinker
    from tinker import types

    server, key = tinker_server
    assert key.startswith("tml-")
    # --- the user's script: only base_url and api_key point at lorafleet ---
    service = tinker.ServiceClient(base_url=server.url, api_key=key)
    training = service.create_lora_training_client(base_model="tiny-llama", rank=8, seed=0).result()
    tokenizer = training.get_tokenizer()  # from the base's local folder (get_info's tokenizer_id)
    tokens = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    weights = [0.0, 0.0] + [1.0] * (len(tokens) - 3)  # the first two targets are prompt
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )
    losses = []
    for i in range(STEPS):
        if i == STEPS - 1:
            before = training.forward([datum], "cross_entropy").result().metrics["loss:sum"]
        step = training.forward_backward([datum], "cross_entropy")
        update = training.optim_step(types.AdamParams(learning_rate=3e-3))
        result = step.result()
        update.result()
        losses.append(result.metrics["loss:sum"])
    # --- what it saw ---
    logprobs = result.loss_fn_outputs[0]["logprobs"].to_numpy()
    assert logprobs.shape == (len(tokens) - 1,)
    assert -(logprobs * weights).sum() == pytest.approx(losses[-1], rel=1e-5)
    # The tiny base's logits span little: the loss falls steadily but not far.
    assert losses[-1] < 0.9 * losses[0], losses
    assert sum(losses[10:]) < sum(losses[:10]), losses
    info = training.get_info()
    assert info.lora_rank == 8 and info.model_data.model_name == "tiny-llama"
    assert info.model_id.endswith(":train:0")

    # forward (no gradient) saw the same weights as the last step's forward_backward.
    assert before == pytest.approx(losses[-1], rel=1e-6)
    # Its host's poll names what the model holds, for admission (core.tinker_memory).
    reports = host_reports(server.namespace)
    held = {m: v for r in reports for m, v in r.get("request_models", {}).items()}
    assert held[info.model_id]["lora"]["rank"] == 8
    assert (held[info.model_id]["rows"], held[info.model_id]["width"]) == (1, len(tokens) - 1)

    # save_state, then a second client from it with its optimizer: both continue alike.
    state = training.save_state("mid").result().path
    assert state == f"tinker://{info.model_id}/weights/mid"
    twin = service.create_training_client_from_state_with_optimizer(state).result()
    assert twin.model_id.endswith(":train:1")
    trails = []
    for client in (training, twin):
        trail = []
        for _ in range(2):
            step = client.forward_backward([datum], "cross_entropy")
            client.optim_step(types.AdamParams(learning_rate=3e-3)).result()
            trail.append(step.result().metrics["loss:sum"])
        trails.append(trail)
    assert trails[0] == trails[1]  # bit for bit: the same factors and Adam moments

    # The weights, downloaded the SDK's way (`tinker checkpoint download`), load in peft
    # and give transformers' logprobs equal to `forward`'s.
    saved = training.save_weights_external("final").result().path
    expected = training.forward([datum], "cross_entropy").result()
    out = tmp_path / "download"
    tinker_cli = Path(sys.executable).parent / "tinker"
    subprocess.run(
        [str(tinker_cli), "checkpoint", "download", saved, "--output", str(out)],
        env={**os.environ, "TINKER_API_KEY": key, "TINKER_BASE_URL": server.url},
        check=True,
        capture_output=True,
    )
    folder = out / saved.removeprefix("tinker://").replace("/", "_")
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    with torch.no_grad():
        logits = merged(torch.tensor([tokens[:-1]])).logits[0]
    ours = torch.log_softmax(logits, -1)[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]
    theirs = torch.tensor(expected.loss_fn_outputs[0]["logprobs"].to_numpy())
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    # Usage (issue 21): every forward_backward's tokens trained, every forward's prefilled,
    # counted as their answers were stored, with the device time they took.
    bearer = {"Authorization": f"Bearer {key}"}
    days = httpx.get(f"{server.url}/v1/usage", headers=bearer, timeout=60).json()["data"]
    assert sum(d["tokens_trained"] for d in days) == (STEPS + 4) * (len(tokens) - 1)
    assert sum(d["tokens_prefilled"] for d in days) == 2 * (len(tokens) - 1)
    assert sum(d["device_seconds"] for d in days) > 0

    # The protocol's edges, over plain HTTP with the same key.
    headers = {"X-API-Key": key}
    with httpx.Client(base_url=f"{server.url}/api/v1", headers=headers, timeout=60) as http:
        adam = {"learning_rate": 0.0}
        seq = 1000  # far past the client's own: it waits for the gap before it to fill
        body = {"model_id": info.model_id, "seq_id": seq, "adam_params": adam}
        first = http.post("/optim_step", json=body).json()
        again = http.post("/optim_step", json=body).json()
        assert again["request_id"] == first["request_id"]  # a retry finds the first future
        bad = http.post("/optim_step", json={**body, "seq_id": 0})
        assert bad.status_code == 400 and "seq_id" in bad.text
        unknown = http.post(
            "/create_model",
            json={
                "session_id": "x",
                "model_seq_id": 0,
                "base_model": "nope",
                "lora_config": {"rank": 4},
            },
        )
        assert unknown.status_code == 400 and "base_model" in unknown.text
        other = http.post(
            "/get_info", json={"model_id": info.model_id}, headers={"X-API-Key": "tml-wrong"}
        )
        assert other.status_code == 401


def host_reports(namespace: str) -> list[Any]:
    """Every pack host's poll in the server's namespace (Ray is the shared cluster's)."""
    import ray

    from core.host_protocol import HOST_PREFIX

    names = [
        e["name"]
        for e in ray.util.list_named_actors(all_namespaces=True)
        if e["namespace"] == namespace and e["name"].startswith(HOST_PREFIX)
    ]
    return [ray.get(ray.get_actor(n, namespace=namespace).poll.remote({})) for n in names]


def assert_same_final_weights(data_dir: Path, one: str, other: str, what: str = "") -> None:
    """Two models' `save_state("final")` weights, as stored, are equal bit for bit."""
    import torch
    from safetensors.torch import load_file

    from core.object_keys import tinker_checkpoint_prefix

    weights = [
        load_file(
            data_dir
            / "objects"
            / tinker_checkpoint_prefix("t1", model_id, "weights/final")
            / "adapter_model.safetensors"
        )
        for model_id in (one, other)
    ]
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for tensor_name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][tensor_name]), (what, tensor_name)


def _client_script(
    service: Any, seed: int, loss_fn: str, data: list[Any], config: dict[str, float] | None
) -> tuple[str, list[float]]:
    """One SDK client's calls: STEPS_SHARED steps of forward_backward + optim_step, then
    save_state("final"). Its model id and its losses."""
    from tinker import types

    training = service.create_lora_training_client(
        base_model="tiny-llama", rank=4, seed=seed
    ).result()
    losses = []
    for _ in range(STEPS_SHARED):
        step = training.forward_backward(data, loss_fn, loss_fn_config=config)
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        losses.append(step.result().metrics["loss:sum"])
    training.save_state("final").result()
    return str(training.model_id), losses


def test_two_sdk_clients_and_a_job_on_one_host_equal_each_client_alone(
    tinker_server: tuple[LorafleetServer, str],
) -> None:
    """Acceptance 2 of issue 21: two SDK clients (cross_entropy, ppo) and one OpenAI job
    train on one warm host at once; each client's losses and final weights equal the same
    calls with no other member working on the host."""
    import sqlite3
    import threading

    import tinker
    from tinker import types

    from tests.e2e.test_training_job import DATA, started, submit, upload

    server, key = tinker_server
    # Two clients whose data differ in length (one pass through the base pads them alike).
    sft = [
        types.Datum(
            model_input=types.ModelInput.from_ints(list(range(5, 5 + n))),
            loss_fn_inputs={"target_tokens": list(range(6, 6 + n)), "weights": [1.0] * n},
        )
        for n in (9, 12)
    ]
    n = 14
    rl = [
        types.Datum(
            model_input=types.ModelInput.from_ints([40 + 3 * i for i in range(n)]),
            loss_fn_inputs={
                "target_tokens": [41 + 3 * i for i in range(n)],
                "logprobs": [-6.0 + 2.5 * (i % 3) for i in range(n)],  # both clips bind
                "advantages": [1.0 if i % 2 else -0.5 for i in range(n)],
            },
        )
    ]
    clients = {
        "sft": (11, "cross_entropy", sft, None),
        "rl": (12, "ppo", rl, {"clip_low_threshold": 0.7, "clip_high_threshold": 1.3}),
    }

    def run(name: str, out: dict[str, tuple[str, list[float]]]) -> None:
        service = tinker.ServiceClient(base_url=server.url, api_key=key)
        try:
            out[name] = _client_script(service, *clients[name])
        finally:
            service.close("success").result()

    alone: dict[str, tuple[str, list[float]]] = {}
    for name in clients:  # each with the host to itself
        run(name, alone)

    with server.client() as http:
        job = submit(
            http,
            model="tiny-llama",
            training_file=upload(http, DATA),
            seed=5,
            hyperparameters={"n_epochs": 100},  # cancelled once the clients are done
        )
        wait_for_condition(  # the job trains before the clients start, and after they end
            lambda: any(e["type"] == "metrics" for e in server.all_events(http, job["id"])),
            timeout=120,
            interval=0.2,
            what="the job's first step",
        )
        together: dict[str, tuple[str, list[float]]] = {}
        threads = [threading.Thread(target=run, args=(name, together)) for name in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "running"
        host = started(server, http, job["id"])["run_id"]
        assert http.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200

    data_dir = Path(server.env["LORAFLEET_DATA_DIR"])
    with sqlite3.connect(data_dir / "lorafleet.db") as db:
        ids = [together[name][0] for name in clients]
        rows = db.execute(
            f"SELECT host_id FROM tinker_models WHERE id IN ({','.join('?' * len(ids))})", ids
        ).fetchall()
    assert {row[0] for row in rows} == {host}  # one host: the job's and both clients'

    for name in clients:
        (alone_id, alone_losses), (shared_id, shared_losses) = alone[name], together[name]
        assert shared_losses == alone_losses, name  # bit for bit (fp32)
        assert_same_final_weights(data_dir, alone_id, shared_id, name)
