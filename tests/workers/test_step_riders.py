"""One step for both kinds of member (issue 21; workers.host.step_riders): a Tinker model's
forward_backward rides in a job's step, in the same forward through the base as the job's
batch, and each equals itself alone bit for bit: the client's losses, log-probs and factors,
and the job's factors, in fp32 and in bf16 (the client's rows padded as alone: a rider
joins the forward of its own width). In one process (a one-rank gloo group, no
DeepSpeed); through the SDK and a real host: tests/e2e/test_tinker_sdk.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from core.objectstore import ObjectStoreConfig, open_object_store
from tests.workers.test_pack_host import JOB_A
from tests.workers.test_step_failures import one_rank_group  # noqa: F401 - a fixture
from workers.host.request_slots import RequestSlots
from workers.host.slot import DROPOUT_STREAM, INIT_STREAM, JobSlot, load_job_slot
from workers.host.step import WIDTH_BUCKET, PackContext, train_step, width_of
from workers.host.step_riders import padded_width, take_riders
from workers.lora.packed_layer import (
    Routing,
    adaptable_layers,
    matching_linear_layers,
    slot_parameters,
    slot_state_dict,
    wrap_linear_layers,
)

pytestmark = pytest.mark.slow  # trains (a few seconds)
STEPS = 3
CLIENT = "c:train:0"
ADAM = {
    "adam_params": {
        "learning_rate": 1e-2,
        "beta1": 0.9,
        "beta2": 0.95,
        "eps": 1e-12,
        "weight_decay": 0.0,
        "grad_clip_norm": 0.0,
    }
}


class Host:
    """A fresh tiny base with every linear layer packable: a job slot and a Tinker slot."""

    def __init__(self, tiny_base: Path, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tiny_base)
        self.tokenizer.pad_token = self.tokenizer.pad_token or self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=dtype)
        self.model.requires_grad_(False)
        self.model.train()
        self.routing = Routing()
        self.layers = wrap_linear_layers(self.model, adaptable_layers(self.model), self.routing)
        self.forwards = 0  # calls of the whole model: one per pass through the base

        def count(*_: Any) -> None:
            self.forwards += 1

        self.model.register_forward_pre_hook(count)
        pad = self.tokenizer.pad_token_id
        self.requests = RequestSlots(
            self.model, self.layers, self.routing, torch.device("cpu"), pad, rank=0
        )
        self.ctx = PackContext(
            model=self.model,
            routing=self.routing,
            pad_token_id=pad,
            device=torch.device("cpu"),
            rank=0,
            world_size=1,
            report=lambda *_: None,
        )

    def add_job(self, tiny_base: Path, store: ObjectStoreConfig) -> JobSlot:
        spec = replace(JOB_A, tenant="t", base_model_uri=str(tiny_base))
        slot = load_job_slot(spec, open_object_store(store), self.tokenizer, 1)
        init = slot.generator(INIT_STREAM)
        for path in matching_linear_layers(self.model, "all-linear"):
            self.layers[path].add_slot(slot.config, init, torch.device("cpu"))
        slot.setup_optimizer(slot_parameters(self.model, JOB_A.job_id))
        self.routing.generators[JOB_A.job_id] = slot.generator(DROPOUT_STREAM)
        return slot

    def add_client(self) -> None:
        self.call("create_model", {"lora": {"rank": 4, "seed": 3}})

    def call(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        self.requests.run([request(kind, payload)])
        (answer,) = self.requests.take_answers()
        assert answer["error"] is None, answer["error"]
        return answer


def request(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    return {"request_id": kind, "model_id": CLIENT, "kind": kind, "payload": payload}


def client_work(width: int) -> dict[str, Any]:
    """Two data, the longer one 3 tokens short of the job's padded width of this step:
    padded to that width (one width group with the job), alone as well as riding."""
    tokens = [5 + (7 * i) % 200 for i in range(width - 3)]
    data = [
        {"tokens": t[:-1], "target_tokens": t[1:], "weights": [1.0] * (len(t) - 1)}
        for t in (tokens[: width // 2], tokens + [9])
    ]
    assert padded_width([len(d["tokens"]) for d in data], WIDTH_BUCKET) == width
    return {"loss_fn": "cross_entropy", "data": data}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_client_and_a_job_share_each_steps_forward_and_equal_themselves_alone(
    tiny_base: Path, store_config: ObjectStoreConfig, dtype: torch.dtype
) -> None:
    together = Host(tiny_base, dtype)
    job = together.add_job(tiny_base, store_config)
    together.add_client()
    widths, shared = [], []
    for _ in range(STEPS):
        widths.append(width_of(job))
        work = request("forward_backward", client_work(widths[-1]))
        riders, rest = take_riders(
            [work, request("optim_step", ADAM)], together.requests, WIDTH_BUCKET
        )
        assert riders is not None and [r["kind"] for r in rest] == ["optim_step"]
        before = together.forwards
        train_step(together.ctx, [job], riders)
        assert together.forwards == before + 1  # the client's rows and the job's: one pass
        together.requests.run(rest)
        answers = together.requests.take_answers()
        assert [a["error"] for a in answers] == [None, None]
        shared.append(answers[0])
    assert job.step == STEPS
    # Usage (core.usage): the client's tokens, and a share of the step's device-seconds.
    assert shared[0]["usage"]["tokens"] == {"trained": widths[0] // 2 - 1 + widths[0] - 3}
    assert shared[0]["usage"]["device_seconds"] > 0

    job_alone = Host(tiny_base, dtype)
    solo = job_alone.add_job(tiny_base, store_config)
    for _ in range(STEPS):
        train_step(job_alone.ctx, [solo])
    client_alone = Host(tiny_base, dtype)
    client_alone.add_client()
    alone = []
    for width in widths:
        alone.append(client_alone.call("forward_backward", client_work(width)))
        client_alone.call("optim_step", ADAM)

    for mine, theirs in zip(shared, alone, strict=True):
        assert mine["result"] == theirs["result"]  # losses and every log-prob, bit for bit
    for host, other, name in (
        (together, job_alone, JOB_A.job_id),
        (together, client_alone, CLIENT),
    ):
        ours, reference = slot_state_dict(host.model, name), slot_state_dict(other.model, name)
        assert ours.keys() == reference.keys() and ours
        for key in ours:
            assert torch.equal(ours[key], reference[key]), (name, key)


def test_a_bad_datum_fails_its_request_alone_before_the_shared_forward(tiny_base: Path) -> None:
    host = Host(tiny_base)
    host.add_client()
    vocab = host.model.config.vocab_size
    bad = {"loss_fn": "cross_entropy", "data": [{"tokens": [vocab], "target_tokens": [1]}]}
    riders, rest = take_riders([request("forward_backward", bad)], host.requests, WIDTH_BUCKET)
    assert riders is None and rest == []
    (answer,) = host.requests.take_answers()
    assert "tokens must be ids in" in answer["error"]
