"""Tinker sampling through the official `tinker` SDK against a live server (issue 21), the
sampler played in this process (tests/api/samplers.py): `create_sampling_client` →
`sample` gives the forward pass's greedy tokens and logprobs, sequence ids and stop reasons;
`save_weights_for_sampler` without a path answers a sampling session; another tenant's
sampler is a 404."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from api.app import create_app
from orchestrator.settings import Settings
from tests.api.samplers import samples_answered
from tests.api.test_tinker_api import keys, post

PROMPT = [5, 9, 42, 7, 100]


@pytest.fixture()
def database_url(tmp_path: Path) -> str:
    """SQLite only: these rows are the Tinker requests' (tested on both databases there),
    and the main stage's time is short."""
    return f"sqlite:///{tmp_path / 'lorafleet.db'}"


@pytest.fixture()
def sampling_server(live_server: str, settings: Settings, tiny_base: Path) -> Iterator[str]:
    with samples_answered(settings, tiny_base):
        yield live_server


def test_the_sdk_samples_the_forward_passs_tokens_and_logprobs(
    sampling_server: str, tiny_base: Path
) -> None:
    import tinker

    # Closed at the end: a session left open heartbeats on after its server has gone.
    with tinker.ServiceClient(base_url=sampling_server, api_key="tml-open") as service:
        client = service.create_sampling_client(base_model="tiny").result()
        sample_like_a_forward_pass(client, tiny_base)


def sample_like_a_forward_pass(client: Any, tiny_base: Path) -> None:
    from tinker import types
    from transformers import AutoModelForCausalLM

    greedy = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    answer = client.sample(types.ModelInput.from_ints(PROMPT), 2, greedy).result()
    [first, second] = answer.sequences
    assert first.tokens == second.tokens and len(first.tokens) == 6
    assert first.stop_reason == "length" and first.sequence_id != second.sequence_id
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + first.tokens])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)[len(PROMPT) - 1 : -1]
    assert first.tokens == logprobs.argmax(dim=-1).tolist()
    expected = logprobs.gather(1, torch.tensor(first.tokens)[:, None])[:, 0]
    assert first.logprobs == pytest.approx(expected.tolist(), abs=1e-4)
    # A stop token ends the sequence with it, said as "stop".
    stop = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[first.tokens[1]])
    [cut] = client.sample(types.ModelInput.from_ints(PROMPT), 1, stop).result().sequences
    assert cut.stop_reason == "stop" and cut.tokens == first.tokens[:2]


def test_sampling_sessions_are_checked_and_scoped(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"warm_hosts": 1}))
    with TestClient(app) as client:
        _, mine = keys(client).create("acme", prefix="tml-")
        _, theirs = keys(client).create("globex", prefix="tml-")
        session = post(client, mine, "create_session", json={}).json()["session_id"]
        created = post(
            client,
            mine,
            "create_model",
            json={
                "session_id": session,
                "model_seq_id": 0,
                "base_model": "tiny",
                "lora_config": {"rank": 4},
            },
        ).json()
        # No path: the save's row carries a sampling session on the weights it writes.
        saved = post(
            client,
            mine,
            "save_weights_for_sampler",
            json={"model_id": created["model_id"], "seq_id": 1, "sampling_session_seq_id": 0},
        )
        assert saved.status_code == 200, saved.text
        sampler_id = f"{session}:sample:0"
        got = client.get(f"/api/v1/samplers/{sampler_id}", headers={"X-API-Key": mine}).json()
        assert got == {
            "sampler_id": sampler_id,
            "base_model": "tiny",
            "model_path": f"tinker://{created['model_id']}/sampler_weights/sampler-0",
        }
        other = client.get(f"/api/v1/samplers/{sampler_id}", headers={"X-API-Key": theirs})
        assert other.status_code == 404
        assert other.json()["error"]["param"] == "sampling_session_id"
        body = {
            "sampling_session_id": sampler_id,
            "seq_id": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
            "sampling_params": {"max_tokens": 3},
        }
        first = post(client, mine, "asample", json=body).json()
        assert post(client, mine, "asample", json=body).json() == first  # a retry: one future
        assert len(first["sample_sequence_ids"]) == 1
        assert post(client, theirs, "asample", json=body).status_code == 404
        bad = post(client, mine, "asample", json={**body, "sampling_params": {}})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "sampling_params.max_tokens"
        path = post(
            client,
            theirs,
            "create_sampling_session",
            json={
                "session_id": session,
                "sampling_session_seq_id": 5,
                "model_path": got["model_path"],
            },
        )
        assert path.status_code == 404
