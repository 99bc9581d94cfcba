"""An evaluation changes no adapter, in one process (a one-rank gloo group, no DeepSpeed): job
E (LoRA dropout on) is evaluated after every step on a validation file of 3 chunks while job X
shares its forward (same data width); both end bit-identical to a pack where E has no
validation file, and E's dropout stream is where it would be. (On the real stack, 2 ranks and
ZeRO-3, with early stopping: tests/workers/test_validation_host.py.)"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core.objectstore import ObjectStoreConfig, open_object_store
from core.spec import JobSpec
from tests.workers.conftest import dataset
from tests.workers.test_step_failures import JOB_A, JOB_X, one_rank_group  # noqa: F401
from workers.host.evaluation import evaluate_step
from workers.host.slot import DROPOUT_STREAM, INIT_STREAM, JobSlot, load_job_slot
from workers.host.step import PackContext, train_step
from workers.lora.packed_layer import (
    Routing,
    matching_linear_layers,
    slot_parameters,
    slot_state_dict,
    wrap_linear_layers,
)

pytestmark = pytest.mark.slow  # trains (a few seconds)
STEPS = 4
VALID_KEY = "files/shared/valid-1.jsonl"
EVALUATED = replace(
    JOB_A,
    validation_file_key=VALID_KEY,
    training=JOB_A.training.model_copy(update={"n_evals": 100}),  # after every step
)


def train(
    tiny_base: Path, store: ObjectStoreConfig, jobs: list[JobSpec]
) -> tuple[dict[str, dict[str, torch.Tensor]], list[JobSlot], Routing, int]:
    """Each job's first STEPS steps, evaluations in between as a host makes them:
    (factors, slots, routing, host steps)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model.requires_grad_(False)
    routing = Routing()
    layers = wrap_linear_layers(model, matching_linear_layers(model, "all-linear"), routing)
    slots = []
    for job in jobs:
        spec = replace(job, tenant="t", base_model_uri=str(tiny_base))
        slot = load_job_slot(spec, open_object_store(store), tokenizer, 1)
        init = slot.generator(INIT_STREAM)
        for path in matching_linear_layers(model, "all-linear"):
            layers[path].add_slot(slot.config, init, torch.device("cpu"))
        slot.setup_optimizer(slot_parameters(model, job.job_id))
        routing.generators[job.job_id] = slot.generator(DROPOUT_STREAM)
        slots.append(slot)
    ctx = PackContext(model, routing, tokenizer.pad_token_id, torch.device("cpu"), 0, 1, print)
    model.train()
    host_steps = 0
    while any(s.step < STEPS or s.evaluating for s in slots):
        host_steps += 1
        training = [s for s in slots if not s.evaluating and s.step < STEPS]
        evaluating = [s for s in slots if s.evaluating]
        if training:
            train_step(ctx, training)
        for slot, evaluation in evaluate_step(ctx, evaluating):
            assert slot.validation is not None
            slot.validation.finish(evaluation)
        for slot in training:
            if slot.validation is not None and slot.validation.due(slot.step, slot.total_steps):
                slot.validation.start(slot.step, slot.total_steps)
    return {s.job_id: slot_state_dict(model, s.job_id) for s in slots}, slots, routing, host_steps


def test_an_evaluated_job_and_its_mate_train_bit_identical_to_a_pack_without_validation(
    tiny_base: Path, store_config: ObjectStoreConfig
) -> None:
    open_object_store(store_config).put_bytes(VALID_KEY, dataset(1, 12))
    plain, _, plain_routing, plain_steps = train(tiny_base, store_config, [JOB_A, JOB_X])
    evaluated, slots, routing, host_steps = train(tiny_base, store_config, [EVALUATED, JOB_X])
    validation = slots[0].validation
    assert validation is not None and validation.chunk_rows == 4
    assert len(validation.examples) == 12  # 3 chunks: each evaluation spans 3 host steps
    assert host_steps == plain_steps + 3 * STEPS
    assert validation.done_step == STEPS and validation.latest["valid_loss"] > 0
    for job_id, factors in plain.items():
        assert all(torch.equal(evaluated[job_id][k], t) for k, t in factors.items()), job_id
    # No draw from E's dropout stream: it is where the plain pack left it.
    assert torch.equal(
        routing.generators["job-a"].get_state(), plain_routing.generators["job-a"].get_state()
    )
