"""Every per-job part of a pack step fails its job alone (workers.host.step, step_rows,
step_metrics): a job whose width, rows, their collation or its dtypes raise ends FAILED with
an error event naming the phase and the cause, its pack-mates' factors equal, bit for bit,
those of a pack that never had it, and a Tinker model riding the same step is answered with
the losses and factors it has alone. In one process (a one-rank gloo group, no DeepSpeed),
with the fixtures of tests/workers/test_step_failures.py and test_step_riders.py.

Each failure is real code raising for one job only: the named function is monkeypatched to
raise for job-x (or made to hand job-x corrupt rows, which the real `collate` rejects); the
other jobs run the real function."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from core.objectstore import ObjectStoreConfig
from tests.workers.test_step_failures import (  # noqa: F401 - fixtures
    JOB_A,
    JOB_B,
    JOB_X,
    one_rank_group,
    train,
    without_x,
)
from tests.workers.test_step_riders import ADAM, CLIENT, Host, client_work, request
from workers.host import step, step_rows
from workers.host.slot import JobSlot, SlotState
from workers.host.step import WIDTH_BUCKET, train_step, width_of
from workers.host.step_riders import take_riders
from workers.lora.packed_layer import slot_state_dict

pytestmark = pytest.mark.slow  # trains (a few seconds)
real_next_rows = JobSlot.next_rows


def failing_rows(job_id: str, at_step: int) -> Any:
    """`JobSlot.next_rows`, raising for `job_id` at its step `at_step` only."""

    def next_rows(self: JobSlot, rank: int, world_size: int) -> Any:
        if (self.job_id, self.step) == (job_id, at_step):
            raise RuntimeError("next_rows broke")
        return real_next_rows(self, rank, world_size)

    return next_rows


def corrupt_rows(self: JobSlot, rank: int, world_size: int) -> Any:
    """job-x's rows at step 1 with one label short: the real `collate` raises on them."""
    rows = real_next_rows(self, rank, world_size)
    if (self.job_id, self.step) == ("job-x", 1):
        rows = [replace(rows[0], labels=rows[0].labels[:-1]), *rows[1:]]
    return rows


def patch_width(monkeypatch: pytest.MonkeyPatch) -> None:
    real = step_rows.width_of

    def width(slot: JobSlot, bucket: int = WIDTH_BUCKET) -> int:
        if (slot.job_id, slot.step) == ("job-x", 1):
            raise RuntimeError("width_of broke")
        return real(slot, bucket)

    monkeypatch.setattr(step_rows, "width_of", width)


def patch_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    real = step.dtypes_of

    def dtypes(model: Any, slot: JobSlot, loss: torch.Tensor) -> dict[str, str]:
        if slot.job_id == "job-x":
            raise RuntimeError("dtypes_of broke")
        return real(model, slot, loss)

    monkeypatch.setattr(step, "dtypes_of", dtypes)


def patch_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    real = step.metrics_data

    def metrics(slot: JobSlot, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if (slot.job_id, slot.step) == ("job-x", 2):  # the data of its step 2's event
            raise RuntimeError("metrics_data broke")
        return real(slot, *args, **kwargs)

    monkeypatch.setattr(step, "metrics_data", metrics)


# (what fails, how, its step, the phase its event names, what its error says); the data of
# a metrics event is made after the ranks' last collective, from values the same on every
# rank: it fails the job as a non-finite loss does, with no phase.
CASES = {
    "next_rows": (
        lambda mp: mp.setattr(JobSlot, "next_rows", failing_rows("job-x", 1)),
        1,
        "data",
        "RuntimeError: next_rows broke",
    ),
    "collate": (
        lambda mp: mp.setattr(JobSlot, "next_rows", corrupt_rows),
        1,
        "data",
        "RuntimeError: The expanded size",
    ),
    "width_of": (patch_width, 1, "data", "RuntimeError: width_of broke"),
    "dtypes_of": (patch_dtypes, 0, "metrics", "RuntimeError: dtypes_of broke"),
    "metrics_data": (patch_metrics, 1, None, "RuntimeError: metrics_data broke"),
}


@pytest.mark.parametrize("what", list(CASES))
def test_a_job_whose_own_part_raises_fails_alone_and_its_mates_train_as_without_it(
    tiny_base: Path,
    store_config: ObjectStoreConfig,
    without_x: dict[str, dict[str, torch.Tensor]],  # noqa: F811 - a fixture
    monkeypatch: pytest.MonkeyPatch,
    what: str,
) -> None:
    patch, at_step, phase, error = CASES[what]
    patch(monkeypatch)
    factors, events, slots = train(tiny_base, store_config, [JOB_A, JOB_X, JOB_B], ())

    assert {s.job_id: s.state for s in slots} == {
        "job-a": SlotState.TRAINING,
        "job-x": SlotState.FAILED,
        "job-b": SlotState.TRAINING,
    }
    [(job_id, _, message, data)] = [e for e in events if e[1] == "job_failed"]
    if phase is None:
        assert job_id == "job-x" and message == f"Training failed: {error}"
    else:
        assert job_id == "job-x" and f"in its {phase} at step {at_step}" in message
        assert data["phase"] == phase and data["error"].startswith(error), data["error"]
        assert what in data["traceback"]  # the traceback names the function that raised
    x_steps = [e[3]["step"] for e in events if e[1] == "metrics" and e[0] == "job-x"]
    assert x_steps == list(range(1, at_step + 1))  # the failing step reports no metrics
    for mate in ("job-a", "job-b"):
        steps = [e[3]["step"] for e in events if e[1] == "metrics" and e[0] == mate]
        assert steps == [1, 2, 3]
        for key, tensor in factors[mate].items():
            assert torch.equal(tensor, without_x[mate][key]), (mate, key)


def test_a_job_alone_in_its_forward_whose_rows_fail_still_makes_the_forward(
    tiny_base: Path, store_config: ObjectStoreConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing else in its width group: the forward (a collective under ZeRO-3, which the
    other ranks make with their rows) runs on a placeholder row, and the job fails alone."""
    monkeypatch.setattr(JobSlot, "next_rows", failing_rows("job-x", 1))
    _, events, slots = train(tiny_base, store_config, [JOB_X], ())
    assert [s.state for s in slots] == [SlotState.FAILED]
    assert [(e[0], e[3]["phase"]) for e in events if e[1] == "job_failed"] == [("job-x", "data")]


def test_a_client_riding_a_step_whose_job_fails_is_answered_as_alone(
    tiny_base: Path, store_config: ObjectStoreConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's rows raise in its first step; the Tinker client's forward_backward in the
    same step (the job's width) is answered, and its losses, log-probs and factors after its
    optim_step equal those of the client alone, bit for bit."""
    together = Host(tiny_base)
    job = together.add_job(tiny_base, store_config)
    together.add_client()
    events: list[tuple[Any, ...]] = []
    together.ctx.report = lambda *event: events.append(event)
    monkeypatch.setattr(JobSlot, "next_rows", failing_rows(JOB_A.job_id, 0))
    width = width_of(job)
    work = request("forward_backward", client_work(width))
    riders, rest = take_riders([work, request("optim_step", ADAM)], together.requests, WIDTH_BUCKET)
    assert riders is not None
    train_step(together.ctx, [job], riders)
    together.requests.run(rest)
    shared = together.requests.take_answers()
    assert [a["error"] for a in shared] == [None, None]
    assert job.state is SlotState.FAILED
    assert [(e[0], e[3]["phase"]) for e in events if e[1] == "job_failed"] == [
        (JOB_A.job_id, "data")
    ]

    alone = Host(tiny_base)
    alone.add_client()
    theirs = alone.call("forward_backward", client_work(width))
    alone.call("optim_step", ADAM)
    assert shared[0]["result"] == theirs["result"]
    ours, reference = slot_state_dict(together.model, CLIENT), slot_state_dict(alone.model, CLIENT)
    assert ours.keys() == reference.keys() and ours
    for key in ours:
        assert torch.equal(ours[key], reference[key]), key


def two_ranks(rank: int, base: Path, store: str, job_ids: list[str], out: str) -> None:
    """One of 2 gloo ranks training `job_ids` for 3 steps; job-x's rows raise on rank 1 only,
    at its step 1. Saves (states, failure events, factors) to `out`.<rank>."""
    import datetime

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.objectstore import open_object_store
    from workers.host.slot import DROPOUT_STREAM, INIT_STREAM, load_job_slot
    from workers.host.step import PackContext
    from workers.lora.packed_layer import (
        Routing,
        adaptable_layers,
        slot_parameters,
        wrap_linear_layers,
    )

    dist.init_process_group(
        "gloo",
        init_method=f"file://{out}.rendezvous",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=120),  # a rank left waiting fails the test
    )

    def next_rows(self: JobSlot, r: int, world_size: int) -> Any:
        if (self.job_id, self.step, r) == ("job-x", 1, 1):
            raise RuntimeError("rank 1's rows broke")
        return real_next_rows(self, r, world_size)

    JobSlot.next_rows = next_rows  # type: ignore[method-assign] - this process only
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.requires_grad_(False)
    routing = Routing()
    layers = wrap_linear_layers(model, adaptable_layers(model), routing)
    specs = {"job-a": JOB_A, "job-b": JOB_B, "job-x": JOB_X}
    slots = []
    for job_id in job_ids:
        spec = replace(specs[job_id], tenant="t", base_model_uri=str(base))
        slot = load_job_slot(spec, open_object_store(ObjectStoreConfig(url=store)), tokenizer, 2)
        init = slot.generator(INIT_STREAM)
        for layer in layers.values():
            layer.add_slot(slot.config, init, torch.device("cpu"))
        slot.setup_optimizer(slot_parameters(model, job_id))
        routing.generators[job_id] = slot.generator(DROPOUT_STREAM)
        slots.append(slot)
    events: list[tuple[Any, ...]] = []
    ctx = PackContext(
        model=model,
        routing=routing,
        pad_token_id=tokenizer.pad_token_id,
        device=torch.device("cpu"),
        rank=rank,
        world_size=2,
        report=lambda *event: events.append(event),
    )
    model.train()
    for _ in range(3):
        train_step(ctx, [s for s in slots if s.state is SlotState.TRAINING])
    result = {
        "states": {s.job_id: s.state.value for s in slots},
        "failed": [(e[0], e[3]["phase"], e[3]["rank"]) for e in events if e[1] == "job_failed"],
        "factors": {s.job_id: slot_state_dict(model, s.job_id) for s in slots},
    }
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.long
def test_a_failure_on_one_rank_is_agreed_by_both_and_the_mates_train_as_without_it(
    tiny_base: Path, store_config: ObjectStoreConfig, tmp_path: Path
) -> None:
    """2 gloo ranks: job-x's rows raise on rank 1 alone; rank 0, where they did not, fails it
    too (the flags ride in the gradient all-reduce), no rank waits on the other, and job-a's
    and job-b's factors equal those of a 2-rank pack without job-x, bit for bit."""
    import torch.multiprocessing as mp

    runs = {}
    for name, job_ids in (("with", ["job-a", "job-x", "job-b"]), ("without", ["job-a", "job-b"])):
        out = str(tmp_path / name)
        mp.spawn(two_ranks, args=(tiny_base, store_config.url, job_ids, out), nprocs=2)
        runs[name] = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for rank in range(2):
        assert runs["with"][rank]["states"] == {
            "job-a": "training",
            "job-x": "failed",
            "job-b": "training",
        }
    assert runs["with"][0]["failed"] == [("job-x", "data", 1)]  # rank 0 reports rank 1's
    for mate in ("job-a", "job-b"):
        ours, reference = runs["with"][0]["factors"][mate], runs["without"][0]["factors"][mate]
        for key in ours:
            assert torch.equal(ours[key], reference[key]), (mate, key)
