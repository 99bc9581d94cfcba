"""The Tinker API's front half (api/tinker) without Ray: keys in X-API-Key, 4xx bodies that
name the field (the SDK retries 5xx and empty 400s for minutes), retries that find the first
future, and tenants that cannot reach each other's models or tinker:// paths."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from orchestrator.api_keys import ApiKeys
from orchestrator.settings import Settings


@pytest.fixture()
def tinker_client(settings: Settings) -> Iterator[TestClient]:
    """The API without the scheduler, keeping a warm host per base (where models train)."""
    with TestClient(create_app(settings.model_copy(update={"warm_hosts": 1}))) as test_client:
        yield test_client


def keys(client: TestClient) -> ApiKeys:
    return client.app.state.services.keys  # type: ignore[attr-defined,no-any-return]


def fb_body(
    model_id: str,
    seq_id: int,
    weights: list[float],
    loss_fn: str = "cross_entropy",
    inputs: dict[str, list[float]] | None = None,
    config: dict[str, float] | None = None,
) -> bytes:
    from tinker import types
    from tinker.proto.request_conv import forward_backward_request_to_proto

    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], **(inputs or {"weights": weights})},  # type: ignore[dict-item]
    )
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=[datum],
            loss_fn=loss_fn,  # type: ignore[arg-type]
            loss_fn_config=config,
        ),
        model_id=model_id,
        seq_id=seq_id,
    )
    return bytes(forward_backward_request_to_proto(request).SerializeToString())


def post(client: TestClient, key: str, path: str, **kwargs: Any) -> Any:
    headers = {"X-API-Key": key, **kwargs.pop("headers", {})}
    return client.post(f"/api/v1/{path}", headers=headers, **kwargs)


def test_without_warm_hosts_create_model_says_what_to_set(client: TestClient) -> None:
    session = post(client, "tml-any", "create_session", json={}).json()["session_id"]
    model = {"session_id": session, "model_seq_id": 0, "base_model": "tiny"}
    refused = post(client, "tml-any", "create_model", json={**model, "lora_config": {"rank": 4}})
    assert refused.status_code == 400 and "LORAFLEET_WARM_HOSTS" in refused.text


def test_tinker_requests_are_checked_scoped_and_retried_safely(tinker_client: TestClient) -> None:
    client = tinker_client
    _, acme = keys(client).create("acme", prefix="tml-")
    _, beta = keys(client).create("beta", prefix="tml-")
    assert acme.startswith("tml-")
    assert post(client, "tml-nope", "create_session", json={}).status_code == 401

    session = post(client, acme, "create_session", json={}).json()["session_id"]
    assert post(client, acme, "session_heartbeat", json={"session_id": session}).status_code == 200
    lora = {"rank": 4}
    model = {"session_id": session, "model_seq_id": 0, "base_model": "tiny", "lora_config": lora}
    for change, param in (
        ({"base_model": "nope"}, "base_model"),
        ({"lora_config": {"rank": 0}}, "lora_config.rank"),
        ({"optimizer_config": {"type": "dimuon"}}, "optimizer_config.type"),
        # lm_head alone (train_unembed) is a model; nothing at all is not.
        (
            {
                "lora_config": {
                    "rank": 4,
                    "train_mlp": False,
                    "train_attn": False,
                    "train_unembed": False,
                }
            },
            "lora_config",
        ),
    ):
        refused = post(client, acme, "create_model", json={**model, **change})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"].startswith(param), refused.text
    created = post(client, acme, "create_model", json=model).json()
    model_id = created["model_id"]
    assert model_id == f"{session}:train:0"
    assert post(client, acme, "create_model", json=model).json() == created  # a retry
    info = post(client, acme, "get_info", json={"model_id": model_id}).json()
    assert info["lora_rank"] == 4 and info["model_data"]["tokenizer_id"].endswith("tiny-llama")

    proto = {"Content-Type": "application/x-protobuf"}
    rl_inputs = {"logprobs": [-1.0, -2.0, -0.5], "advantages": [1.0, 0.0, -1.0]}
    for body, param in (
        (b"\xff\xff not a protobuf", "body"),
        (fb_body(model_id, 1, [1.0, 1.0]), "weights"),
        (fb_body(model_id, 1, [1.0] * 3, "dro"), "loss_fn"),
        (fb_body(model_id, 1, [], "ppo", rl_inputs, {"clip": 1.0}), "loss_fn_config.clip"),
        (fb_body(model_id, 0, [1.0] * 3), "seq_id"),
        (fb_body(model_id, 1, [1.0] * 3, "importance_sampling"), "logprobs"),  # it needs them
    ):
        refused = post(client, acme, "forward_backward", content=body, headers=proto)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param
    accepted = post(
        client,
        acme,
        "forward_backward",
        content=fb_body(model_id, 7, [], "importance_sampling", rl_inputs),
    )
    assert accepted.status_code == 200, accepted.text
    first = post(client, acme, "forward_backward", content=fb_body(model_id, 1, [1.0] * 3))
    again = post(client, acme, "forward_backward", content=fb_body(model_id, 1, [1.0] * 3))
    assert first.json()["request_id"] == again.json()["request_id"]
    step = {"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": -1}}
    refused = post(client, acme, "optim_step", json=step)
    assert refused.status_code == 400 and "learning_rate" in refused.text
    bad_name = {"model_id": model_id, "seq_id": 2, "path": "a/b"}
    assert post(client, acme, "save_weights", json=bad_name).json()["error"]["param"] == "path"

    # Another tenant: the model, its futures and its tinker:// paths are not there.
    assert post(client, beta, "get_info", json={"model_id": model_id}).status_code == 404
    future = {"request_id": first.json()["request_id"]}
    assert post(client, beta, "retrieve_future", json=future).status_code == 404
    theirs = {"session_id": session, "model_seq_id": 1, "path": f"tinker://{model_id}/weights/x"}
    refused = post(client, beta, "load_weights", json={**theirs, "optimizer": False})
    assert refused.status_code == 404 and refused.json()["error"]["param"] == "path"

    # A finished session takes no new model, and its heartbeat says it ended (410).
    post(client, acme, f"sessions/{session}/finish", json={"reason": {"type": "success"}})
    gone = post(client, acme, "session_heartbeat", json={"session_id": session})
    assert gone.status_code == 410
    later = post(client, acme, "create_model", json={**model, "model_seq_id": 2})
    assert later.status_code == 400 and later.json()["error"]["param"] == "session_id"
