"""A DPO job packed with two supervised jobs trains exactly as each alone (the pack's
exactness property, workers.host.step), in one process (a one-rank gloo group, no DeepSpeed,
as tests/workers/test_step_failures.py): its factors and its reward metrics are the same bit
for bit, its reward accuracy rises, and a DPO job started from a checkpoint is measured
against a frozen copy of it (its first step's rewards are 0, its loss log 2)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from core.job_settings import PreferenceSettings
from core.objectstore import ObjectStoreConfig, open_object_store
from core.spec import JobSpec, LoraSettings
from tests.workers.conftest import job
from tests.workers.test_pack_host import JOB_A, JOB_B
from workers.host.objective import add_reference_slot, reference_slot_name
from workers.host.slot import DROPOUT_STREAM, INIT_STREAM, JobSlot, load_job_slot
from workers.host.step import PackContext, train_step
from workers.lora.packed_layer import (
    Routing,
    load_slot_state,
    matching_linear_layers,
    slot_parameters,
    slot_state_dict,
    wrap_linear_layers,
)
from workers.training.preference_loss import REWARD_METRICS

pytestmark = pytest.mark.slow  # trains (a few seconds)
STEPS = 5
PREFERENCE_KEY = "files/shared/pairs.jsonl"
START_KEY = "adapters/shared/start/"
WORDS = ("apple", "green", "light", "music", "paper", "ocean", "river", "stone")
JOB_D = replace(
    job("job-dpo", 0, LoraSettings(r=4, alpha=8, dropout=0.1), learning_rate=2e-2, seed=5),
    training_file_key=PREFERENCE_KEY,
)
JOB_D = replace(
    JOB_D, training=JOB_D.training.model_copy(update={"preference": PreferenceSettings(beta=0.5)})
)


def preference_pairs() -> bytes:
    rows = [
        {
            "input": {"messages": [{"role": "user", "content": f"shout {w}"}]},
            "preferred_output": [{"role": "assistant", "content": w.upper()}],
            "non_preferred_output": [{"role": "assistant", "content": w}],
        }
        for w in WORDS
    ]
    return "\n".join(json.dumps(r) for r in rows).encode()


@pytest.fixture(scope="module", autouse=True)
def one_rank_group() -> Any:
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def store(store_config: ObjectStoreConfig) -> ObjectStoreConfig:
    open_object_store(store_config).put_bytes(PREFERENCE_KEY, preference_pairs())
    return store_config


def train(
    tiny_base: Path, store: ObjectStoreConfig, jobs: list[JobSpec], steps: int = STEPS
) -> tuple[dict[str, dict[str, torch.Tensor]], list[tuple[Any, ...]]]:
    """`steps` steps of `jobs` packed on a fresh copy of the tiny base, set up as a host's
    join does (workers.host.join); (factors, events)."""
    from safetensors.torch import load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    objects = open_object_store(store)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model.requires_grad_(False)
    routing = Routing()
    layers = wrap_linear_layers(model, matching_linear_layers(model, "all-linear"), routing)
    slots: list[JobSlot] = []
    for one in jobs:
        spec = replace(one, tenant="t", base_model_uri=str(tiny_base))
        slot = load_job_slot(spec, objects, tokenizer, 1)
        target = one.lora.target_modules
        paths = matching_linear_layers(model, target if isinstance(target, str) else [*target])
        init = slot.generator(INIT_STREAM)
        for path in paths:
            layers[path].add_slot(slot.config, init, torch.device("cpu"))
        slot.setup_optimizer(slot_parameters(model, one.job_id))
        if one.start_from:
            start = load(objects.get_bytes(one.start_from + "adapter_model.safetensors"))
            load_slot_state(model, one.job_id, start)
            if slot.objective.reference_route == reference_slot_name(one.job_id):
                add_reference_slot([layers[p] for p in paths], slot.config, torch.device("cpu"))
                load_slot_state(model, reference_slot_name(one.job_id), start)
        if one.lora.dropout > 0:
            routing.generators[one.job_id] = slot.generator(DROPOUT_STREAM)
        slots.append(slot)
    events: list[tuple[Any, ...]] = []
    ctx = PackContext(
        model=model,
        routing=routing,
        pad_token_id=tokenizer.pad_token_id,
        device=torch.device("cpu"),
        rank=0,
        world_size=1,
        report=lambda *event: events.append(event),
    )
    model.train()
    for _ in range(steps):
        train_step(ctx, [s for s in slots if s.step < s.total_steps])
    return {s.job_id: slot_state_dict(model, s.job_id) for s in slots}, events


def metrics_of(events: list[tuple[Any, ...]], job_id: str) -> list[dict[str, Any]]:
    return [e[3] for e in events if e[1] == "metrics" and e[0] == job_id]


def test_a_dpo_job_packed_with_two_supervised_jobs_trains_as_each_alone(
    tiny_base: Path, store: ObjectStoreConfig
) -> None:
    packed, events = train(tiny_base, store, [JOB_A, JOB_D, JOB_B])
    assert not [e for e in events if e[1] == "job_failed"]
    for one in (JOB_A, JOB_D, JOB_B):
        alone, alone_events = train(tiny_base, store, [one])
        assert packed[one.job_id].keys() == alone[one.job_id].keys()
        for key, tensor in packed[one.job_id].items():
            assert torch.equal(tensor, alone[one.job_id][key]), (one.job_id, key)
        ours, theirs = metrics_of(events, one.job_id), metrics_of(alone_events, one.job_id)
        assert [m["pack_size"] for m in ours] == [3] * STEPS
        for name in ("train_loss", *(REWARD_METRICS if one is JOB_D else ())):
            assert [m[name] for m in ours] == [m[name] for m in theirs], (one.job_id, name)

    dpo = metrics_of(events, JOB_D.job_id)
    assert not any(name in m for m in metrics_of(events, "job-a") for name in REWARD_METRICS)
    # The adapter starts as the base: rewards 0, loss log 2; then the pairs are learnt.
    assert dpo[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert dpo[0]["train_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert dpo[-1]["train_reward_accuracy"] == 1.0
    assert dpo[-1]["train_reward_margin"] > 0 and dpo[-1]["train_loss"] < math.log(2)
    assert dpo[-1]["train_rewards_chosen"] > dpo[-1]["train_rewards_rejected"]


def test_a_dpo_job_from_a_checkpoint_is_measured_against_that_checkpoint(
    tiny_base: Path, store: ObjectStoreConfig
) -> None:
    """Its reference is a frozen slot holding the start adapter (not the bare base): its
    first step's policy equals the reference, whatever the start adapter did to the base."""
    # Without dropout: with it, the policy's rows (dropped out) differ from the reference's.
    plain = replace(JOB_D, lora=JOB_D.lora.model_copy(update={"dropout": 0.0}))
    trained, _ = train(tiny_base, store, [replace(plain, job_id="job-start")], steps=4)
    from safetensors.torch import save

    open_object_store(store).put_bytes(
        START_KEY + "adapter_model.safetensors", save(trained["job-start"])
    )
    forked = replace(plain, job_id="job-fork", start_from=START_KEY)
    _, events = train(tiny_base, store, [forked, JOB_B], steps=3)
    first, *_ = metrics_of(events, "job-fork")
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["train_rewards_chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["train_rewards_rejected"] == pytest.approx(0.0, abs=1e-6)


def test_a_pair_whose_rejected_side_is_the_longer_row_sets_the_width(
    tiny_base: Path, store: ObjectStoreConfig
) -> None:
    """The padded width is the longest of both sides of every pair in the batch."""
    rows = [
        {
            "input": {"messages": [{"role": "user", "content": f"shout {w}"}]},
            "preferred_output": [{"role": "assistant", "content": w.upper()}],
            "non_preferred_output": [{"role": "assistant", "content": f"{w} " * 12}],
        }
        for w in WORDS[:4]
    ]
    open_object_store(store).put_bytes(
        "files/shared/long-rejected.jsonl", "\n".join(json.dumps(r) for r in rows).encode()
    )
    long_rejected = replace(
        JOB_D,
        job_id="job-long",
        training_file_key="files/shared/long-rejected.jsonl",
        training=JOB_D.training.model_copy(update={"max_seq_len": 96}),
    )
    _, events = train(tiny_base, store, [long_rejected], steps=1)
    assert not [e for e in events if e[1] == "job_failed"]
    assert metrics_of(events, "job-long")[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
