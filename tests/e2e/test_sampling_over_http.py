"""Sampling over HTTP on Ray (issue 21): a real `lorafleet serve`, its scheduler's dispatcher
and a sampler actor of the tiny Llama. The official `openai` SDK's completions on a trained
job's model equal a local peft generate of its adapter (greedy) and differ from the base's;
the official `tinker` SDK's `save_weights_and_get_sampling_client` → `sample` returns tokens
whose logprobs equal `forward`'s."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.api.test_completions import local_greedy
from tests.e2e.conftest import (
    LorafleetServer,
    running_server,
    shared_ray_env,
    tinker_key,
)
from tests.e2e.test_training_job import submit, upload

pytestmark = [pytest.mark.slow, pytest.mark.long]

DATA = [{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a in range(4) for b in range(2)]
PROMPT = "2+1="


@pytest.fixture(scope="module")
def sampling_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, ray_address: str
) -> Iterator[LorafleetServer]:
    folder = tmp_path_factory.mktemp("sampling-server")
    env = shared_ray_env(
        folder,
        tiny_base,
        ray_address,
        warm_hosts="1",  # Tinker models train on a warm host; the job packs beside them
        default_num_workers="1",
    )
    with running_server(env, folder, api_key=tinker_key(env)) as server:
        yield server


def test_completions_of_a_trained_model_through_the_openai_sdk(
    sampling_server: LorafleetServer, tiny_base: Path, tmp_path: Path
) -> None:
    server = sampling_server
    with server.client() as client:
        job = submit(
            client,
            model="tiny-llama",
            training_file=upload(client, DATA),
            suffix="try",
            seed=5,
            hyperparameters={"n_epochs": 2, "batch_size": 4},
            lora={"r": 4, "alpha": 8, "target_modules": "all-linear"},
            training={"learning_rate": 5e-2, "max_seq_len": 32},
        )
        job = server.wait_until_terminal(client, job["id"])
        assert job["status"] == "succeeded", job
        archive = client.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter")
        assert archive.status_code == 200, archive.text
        with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
            tar.extractall(tmp_path / "adapter", filter="data")
    [config] = (tmp_path / "adapter").rglob("adapter_config.json")

    sdk = OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)
    model = job["fine_tuned_model"]
    tuned = sdk.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
    base = sdk.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=6, temperature=0)
    assert tuned.choices[0].text == local_greedy(tiny_base, config.parent, PROMPT, 6)[0]
    assert base.choices[0].text == local_greedy(tiny_base, None, PROMPT, 6)[0]
    assert tuned.choices[0].text != base.choices[0].text
    assert tuned.usage is not None and tuned.usage.prompt_tokens > 0


def test_the_tinker_sdk_samples_what_it_trained(
    sampling_server: LorafleetServer,
) -> None:
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=sampling_server.url, api_key=sampling_server.api_key)
    training = service.create_lora_training_client(base_model="tiny-llama", rank=4, seed=0).result()
    tokens = training.get_tokenizer().encode("The quick brown fox jumps over the lazy dog.")
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    for _ in range(3):
        training.forward_backward([datum], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=2e-2)).result()
    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = tokens[:4]
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    [sequence] = sampler.sample(types.ModelInput.from_ints(prompt), 1, greedy).result().sequences
    assert len(sequence.tokens) == 6 and sequence.stop_reason == "length"
    assert sequence.sequence_id
    # forward over prompt + sampled tokens, with the trained weights: the same logprobs.
    full = prompt + sequence.tokens
    check = types.Datum(
        model_input=types.ModelInput.from_ints(full[:-1]),
        loss_fn_inputs={"target_tokens": full[1:], "weights": [1.0] * (len(full) - 1)},
    )
    forward = training.forward([check], "cross_entropy").result()
    expected = forward.loss_fn_outputs[0]["logprobs"].to_numpy()[-len(sequence.tokens) :]
    assert sequence.logprobs == pytest.approx(expected.tolist(), abs=1e-4)
