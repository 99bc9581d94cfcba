"""A Tinker request that fails, or that adds nothing, leaves its model's gradients as they
were (issue 21): riding a job's step (workers.host.step_riders) or in a pass of several
models (workers.host.request_slots), a `forward` or a failed request adds nothing, not even
zero gradients (which would still step AdamW's moments and weight decay at the next
`optim_step`), and a pass that fails part-way through its backward is run again, each model
alone, without adding anyone's gradients twice. A malformed request is answered with its
error instead of stopping the loop. In one process (a one-rank gloo group, no DeepSpeed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from core.objectstore import ObjectStoreConfig
from tests.workers.test_request_slots import (
    OTHER,
    TEXT,
    adam,
    datum,
    run,
    slots,  # noqa: F401 - a fixture
)
from tests.workers.test_step_failures import one_rank_group  # noqa: F401 - a fixture
from tests.workers.test_step_riders import ADAM, CLIENT, Host, client_work, request
from workers.host.request_slots import RequestSlots
from workers.host.step import WIDTH_BUCKET, train_step, width_of
from workers.host.step_riders import take_riders
from workers.lora.packed_layer import slot_state_dict

pytestmark = pytest.mark.slow  # trains (a few seconds)

# Weight decay: an optim_step over zero gradients would still move the factors.
DECAY = {"adam_params": {**ADAM["adam_params"], "weight_decay": 0.1}}
# Passes the rows' checks before the shared forward, fails in its loss (no `weights`).
NO_WEIGHTS = {
    "loss_fn": "cross_entropy",
    "data": [{"tokens": [5, 6, 7], "target_tokens": [6, 7, 8]}],
}


def test_a_forward_or_a_failed_request_riding_a_step_leaves_its_gradients_as_they_were(
    tiny_base: Path, store_config: ObjectStoreConfig
) -> None:
    """Real failure: a datum without `weights` passes the rows' checks and raises in the
    rider's loss, inside the job's step. Each call is followed by an optim_step; the
    client's factors must equal the same calls on a host of its own (where neither call
    leaves any gradient), and the job's its own solo run."""
    together = Host(tiny_base)
    job = together.add_job(tiny_base, store_config)
    together.add_client()
    calls: list[tuple[str, dict[str, Any]]] = []
    answers = []
    for kind in ("forward", "forward_backward", "forward_backward"):
        payload = client_work(width_of(job)) if len(calls) != 1 else NO_WEIGHTS
        calls.append((kind, payload))
        riders, rest = take_riders(
            [request(kind, payload), request("optim_step", DECAY)], together.requests, WIDTH_BUCKET
        )
        assert riders is not None and len(rest) == 1
        train_step(together.ctx, [job], riders)
        together.requests.run(rest)
        answers.append(together.requests.take_answers())
    assert [[a["error"] is None for a in step] for step in answers] == [
        [True, True],
        [False, True],
        [True, True],
    ]
    assert "KeyError" in answers[1][0]["error"] and "weights" in answers[1][0]["error"]
    assert job.step == 3

    client_alone = Host(tiny_base)
    client_alone.add_client()
    for kind, payload in calls:
        client_alone.requests.run([request(kind, payload), request("optim_step", DECAY)])
        alone = client_alone.requests.take_answers()
        assert [a["error"] is None for a in alone] == [payload is not NO_WEIGHTS, True]
    job_alone = Host(tiny_base)
    solo = job_alone.add_job(tiny_base, store_config)
    for _ in calls:
        train_step(job_alone.ctx, [solo])
    for other, name in ((client_alone, CLIENT), (job_alone, job.job_id)):
        ours, reference = slot_state_dict(together.model, name), slot_state_dict(other.model, name)
        assert ours.keys() == reference.keys() and ours
        for key in ours:
            assert torch.equal(ours[key], reference[key]), (name, key)


def test_a_pass_that_fails_in_its_backward_runs_each_alone_and_adds_nothing_twice(
    slots: RequestSlots,  # noqa: F811 - the fixture
) -> None:
    """Injected failure (a tensor hook, the one part patched): model b's factors of layer 0
    raise when backward reaches them, after model a's later layers (and lm_head) already got
    their gradients. Then each runs alone: a's gradients must be those of a alone (not
    twice), b's untouched, and a `forward` in a pass with a backward adds nothing."""
    for name, seed in (("a:train:0", 1), ("b:train:0", 2), ("c:train:0", 3)):
        run(slots, name, "create_model", {"lora": {"rank": 4, "seed": seed}})
        run(slots, name, "optim_step", adam())  # B leaves zero: every factor gets a gradient
    work = {"a:train:0": [datum(TEXT)], "b:train:0": [datum(OTHER)], "c:train:0": [datum(OTHER)]}

    def call(name: str, kind: str = "forward_backward") -> dict[str, Any]:
        payload = {"loss_fn": "cross_entropy", "data": work[name]}
        return {"request_id": name, "model_id": name, "kind": kind, "payload": payload}

    alone = run(slots, "a:train:0", "forward_backward", call("a:train:0")["payload"])
    expected = [p.grad.clone() for p in slots.slots["a:train:0"].params if p.grad is not None]
    assert len(expected) == len(slots.slots["a:train:0"].params)
    for p in slots.slots["a:train:0"].params:
        p.grad = None

    def fail(_: torch.Tensor) -> None:
        raise RuntimeError("b's backward failed")

    b_params = slots.slots["b:train:0"].params
    hooks = [
        p.register_hook(fail)
        for n, p in slots.model.named_parameters()
        if n.endswith(".b:train:0") and ".layers.0." in n
    ]
    assert hooks
    forwards = slots.routing.forward_id
    slots.run([call("a:train:0"), call("b:train:0")])
    for hook in hooks:
        hook.remove()
    assert slots.routing.forward_id == forwards + 3  # the pair, then each alone
    answers = {a["model_id"]: a for a in slots.take_answers()}
    assert answers["a:train:0"]["error"] is None
    assert "b's backward failed" in answers["b:train:0"]["error"]
    assert answers["a:train:0"]["result"]["outputs"] == alone["outputs"]
    for p, grad in zip(slots.slots["a:train:0"].params, expected, strict=True):
        assert torch.equal(p.grad, grad)
    assert all(p.grad is None for p in b_params)

    slots.run([call("c:train:0", "forward"), call("b:train:0")])  # one pass, with a backward
    assert [a["error"] for a in slots.take_answers()] == [None, None]
    assert all(p.grad is None for p in slots.slots["c:train:0"].params)
    assert all(p.grad is not None for p in b_params)


def test_a_malformed_request_is_answered_with_its_error_and_rides_no_step(
    slots: RequestSlots,  # noqa: F811 - the fixture
) -> None:
    """Real parts: a request whose payload is not an object, taken for a step and run."""
    run(slots, "a:train:0", "create_model", {"lora": {"rank": 4, "seed": 1}})
    bad = {"request_id": "bad", "model_id": "a:train:0", "kind": "forward", "payload": None}
    good = {
        "request_id": "good",
        "model_id": "a:train:0",
        "kind": "forward",
        "payload": {"loss_fn": "cross_entropy", "data": [datum(TEXT)]},
    }
    riders, rest = take_riders([bad, good], slots, WIDTH_BUCKET)
    assert riders is None and rest == [bad, good]
    slots.run(rest)
    answers = slots.take_answers()
    assert [a["request_id"] for a in answers] == ["bad", "good"]
    assert answers[0]["error"] is not None and answers[0]["usage"]["tokens"] == {}
    assert answers[1]["error"] is None


@pytest.mark.parametrize("fit_fails", [False, True])
def test_requests_taken_by_workers_that_end_for_good_are_handed_back(
    tiny_base: Path,
    store_config: ObjectStoreConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fit_fails: bool,
) -> None:
    """The host actor's own class, its `_fit` run in this thread, without Ray: the one part
    replaced is the trainer (`trainer_for`), whose fit takes the ending boundary's requests
    and returns (an ordinary end) or raises (the host gave up). What the workers had taken
    and never answered is handed back unrun, once, with the model's `lost` notice."""
    import importlib.util
    import types

    import ray

    from core.host_protocol import LOST
    from tests.workers.conftest import host_spec

    # A private copy of the module: once Ray has shipped the actor class elsewhere in this
    # session, the class it hands back may be a copy whose functions do not look names up
    # in `workers.host.pack_host` (patching that module's `trainer_for` then misses).
    found = importlib.util.find_spec("workers.host.pack_host")
    assert found is not None and found.loader is not None
    pack_host = importlib.util.module_from_spec(found)
    found.loader.exec_module(pack_host)

    here = types.SimpleNamespace(get_node_id=lambda: "node", current_actor=None)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: here)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    host = pack_host.PackHost.__ray_metadata__.modified_class(
        host_spec(tiny_base, store_config, tmp_path)
    )

    class Trainer:
        def fit(self) -> None:
            changes = host.step_boundary([], {"request_models": []})  # what rank 0 takes
            assert [r["request_id"] for r in changes["requests"]] == ["new"]
            if fit_fails:
                raise RuntimeError("the workers kept failing")

    monkeypatch.setattr(pack_host, "trainer_for", lambda *_, **__: Trainer())
    create = {"lora": {"rank": 4}}
    host.tinker_submit(
        [{"request_id": "new", "model_id": "m", "kind": "create_model", "payload": create}]
    )
    host._fit()
    answers = host.tinker_collect()
    assert [(a["request_id"], a.get("bounced", False)) for a in answers] == [
        ("new", True),
        ("lost-m", False),
    ]
    assert answers[1]["kind"] == LOST
    assert host.tinker_collect() == []
