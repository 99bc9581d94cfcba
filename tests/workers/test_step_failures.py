"""One job's failure in a pack step stays its own (workers.host.step, workers.host.failures),
in one process (a one-rank gloo group, no DeepSpeed): a job made to raise in its forward,
loss, backward or optimizer step fails alone with its traceback in its event, and its two
pack-mates' factors equal, bit for bit, those of a pack that never had it. (On the real
stack, 2 ranks and ZeRO-3: tests/workers/test_pack_host.py.)"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from core.fault_injection import StepFault, StepPhase
from core.objectstore import ObjectStoreConfig, open_object_store
from core.spec import JobSpec
from tests.workers.test_pack_host import JOB_A, JOB_B
from workers.host.slot import DROPOUT_STREAM, INIT_STREAM, JobSlot, SlotState, load_job_slot
from workers.host.step import PackContext, train_step, use_gradient_checkpointing
from workers.lora.packed_layer import (
    Routing,
    matching_linear_layers,
    slot_parameters,
    slot_state_dict,
    wrap_linear_layers,
)

pytestmark = pytest.mark.slow  # trains (a few seconds)
STEPS = 3
# A third job, on the same data as A so that it shares A's forward (one width group).
JOB_X = replace(JOB_A, job_id="job-x", training=JOB_A.training.model_copy(update={"seed": 7}))


@pytest.fixture(scope="module", autouse=True)
def one_rank_group() -> Any:
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def train(
    tiny_base: Path,
    store: ObjectStoreConfig,
    jobs: list[JobSpec],
    faults: tuple[StepFault, ...],
    checkpointing: bool = False,
) -> tuple[dict[str, dict[str, torch.Tensor]], list[tuple[Any, ...]], list[JobSlot]]:
    """STEPS steps of `jobs` packed on a fresh copy of the tiny base; (factors, events, slots)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model.requires_grad_(False)
    routing = Routing()
    if checkpointing:
        use_gradient_checkpointing(model, routing)
    layers = wrap_linear_layers(model, matching_linear_layers(model, "all-linear"), routing)
    slots = []
    for job in jobs:
        spec = replace(job, tenant="t", base_model_uri=str(tiny_base))
        slot = load_job_slot(spec, open_object_store(store), tokenizer, 1)
        target = job.lora.target_modules
        init = slot.generator(INIT_STREAM)
        for path in matching_linear_layers(model, target if isinstance(target, str) else [*target]):
            layers[path].add_slot(slot.config, init, torch.device("cpu"))
        slot.setup_optimizer(slot_parameters(model, job.job_id))
        if job.lora.dropout > 0:
            routing.generators[job.job_id] = slot.generator(DROPOUT_STREAM)
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
        faults=faults,
    )
    model.train()
    for _ in range(STEPS):
        train_step(ctx, [s for s in slots if s.state is SlotState.TRAINING])
    factors = {s.job_id: slot_state_dict(model, s.job_id) for s in slots}
    return factors, events, slots


@pytest.fixture(scope="module")
def without_x(
    tiny_base: Path, store_config: ObjectStoreConfig
) -> dict[str, dict[str, torch.Tensor]]:
    factors, _, _ = train(tiny_base, store_config, [JOB_A, JOB_B], ())
    return factors


@pytest.mark.parametrize("phase", ["forward", "loss", "backward", "optimizer"])
def test_a_job_that_raises_in_its_step_fails_alone_and_its_mates_train_as_without_it(
    tiny_base: Path,
    store_config: ObjectStoreConfig,
    without_x: dict[str, dict[str, torch.Tensor]],
    phase: StepPhase,
) -> None:
    fault = StepFault("job-x", step=1, phase=phase)
    factors, events, slots = train(tiny_base, store_config, [JOB_A, JOB_X, JOB_B], (fault,))

    states = {s.job_id: s.state for s in slots}
    assert states == {
        "job-a": SlotState.TRAINING,
        "job-x": SlotState.FAILED,
        "job-b": SlotState.TRAINING,
    }
    [failed] = [e for e in events if e[1] == "job_failed"]
    job_id, _, message, data = failed
    assert job_id == "job-x" and f"in its {phase} at step 1" in message
    assert data["error_code"] == "training_error" and data["phase"] == phase
    assert "InjectedFault: injected" in data["error"]
    assert "Traceback" in data["traceback"] and "InjectedFault" in data["traceback"]
    x_steps = [e[3]["step"] for e in events if e[1] == "metrics" and e[0] == "job-x"]
    assert x_steps == [1]  # its first step trained; the failing one reports no metrics
    for mate in ("job-a", "job-b"):
        steps = [e[3]["step"] for e in events if e[1] == "metrics" and e[0] == mate]
        assert steps == list(range(1, STEPS + 1))
        ours, reference = factors[mate], without_x[mate]
        assert ours.keys() == reference.keys()
        for key in ours:
            assert torch.equal(ours[key], reference[key]), (mate, key)


def test_a_slot_that_fails_in_a_checkpointed_forward_is_recomputed_as_it_ran(
    tiny_base: Path, store_config: ObjectStoreConfig
) -> None:
    """With gradient checkpointing, backward recomputes each layer: a slot that failed
    mid-forward must be recomputed exactly as the forward ran (torch checks), and the
    mates still train as in a checkpointed pack without it."""
    reference, _, _ = train(tiny_base, store_config, [JOB_A, JOB_B], (), checkpointing=True)
    fault = StepFault("job-x", step=1, phase="forward")
    factors, events, slots = train(
        tiny_base, store_config, [JOB_A, JOB_X, JOB_B], (fault,), checkpointing=True
    )
    assert [s.state for s in slots] == [SlotState.TRAINING, SlotState.FAILED, SlotState.TRAINING]
    assert [e[0] for e in events if e[1] == "job_failed"] == ["job-x"]
    for mate in ("job-a", "job-b"):
        for key, tensor in factors[mate].items():
            assert torch.equal(tensor, reference[mate][key]), (mate, key)
