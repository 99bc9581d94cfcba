"""Tinker models in the memory estimate (core.tinker_memory): a host's report names what its
Tinker slots hold, a job that would fit beside the host's jobs alone waits while its Tinker
models fill the rest, and the dispatcher places a new Tinker model only on a warm host with
room for it (else its creation waits, as when no warm host is up). The scheduler and the
dispatcher run as wired (in-memory hosts, SQLite, no Ray: a host's actor and the send are
stand-ins that record where requests go)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.host_protocol import HostReport, RequestModel
from core.tinker_memory import tinker_demand
from orchestrator.db import make_engine, migrate
from orchestrator.scheduling.scheduler import Scheduler
from orchestrator.tinker.dispatch import TinkerDispatcher
from orchestrator.tinker.rows import PENDING
from orchestrator.tinker.store import TinkerStore
from tests.orchestrator.test_host_scheduling import World, make_world
from tests.orchestrator.test_memory_estimate import BASE, LLAMA_CONFIG
from tests.orchestrator.test_wake_ups import NoRay
from workers.host.requests import RequestQueue

LORA: dict[str, Any] = {"rank": 8, "train_mlp": True, "train_attn": True, "train_unembed": True}
# A Tinker model that has sent forward work: 4 rows of up to 256 tokens.
BUSY: RequestModel = {"lora": LORA, "rows": 4, "width": 256}


def test_a_tinker_models_lora_state_is_what_its_slot_holds() -> None:
    """Its factors as counted (each flag's layers, lm_head for train_unembed) are those a
    host's request slot really makes on a Llama."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from workers.host.request_slots import RequestSlots
    from workers.lora.packed_layer import Routing, adaptable_layers, wrap_linear_layers

    model = LlamaForCausalLM(LlamaConfig(**LLAMA_CONFIG))
    routing = Routing()
    layers = wrap_linear_layers(model, adaptable_layers(model), routing)
    slots = RequestSlots(model, layers, routing, torch.device("cpu"), 0, 0)
    flags = [
        {"rank": 8},  # the SDK's defaults: all three
        {"rank": 4, "train_unembed": False},
        {"rank": 16, "train_mlp": False, "train_unembed": False},
        {"rank": 2, "train_attn": False, "train_mlp": False},  # lm_head only
    ]
    for index, lora in enumerate(flags):
        model_id = f"m{index}"
        request = {"request_id": model_id, "model_id": model_id, "kind": "create_model"}
        slots.run([{**request, "payload": {"lora": lora}}])
        held = sum(p.numel() for p in slots.slots[model_id].params)
        assert tinker_demand(lora).lora_parameters(BASE) == held, lora


def test_a_host_reports_its_tinker_models_and_their_largest_forward_work() -> None:
    queue = RequestQueue()

    def request(n: int, kind: str, payload: dict[str, Any], model_id: str = "m") -> Any:
        return {"request_id": f"r{n}", "model_id": model_id, "kind": kind, "payload": payload}

    def rows(*lengths: int) -> dict[str, Any]:
        return {"data": [{"tokens": [1] * n} for n in lengths], "loss_fn": "cross_entropy"}

    queue.submit([request(0, "create_model", {"lora": LORA})])
    assert queue.memory() == {"m": {"lora": LORA, "rows": 0, "width": 0}}  # queued: counted
    queue.submit([request(1, "forward_backward", rows(5, 9, 7)), request(2, "forward", rows(20))])
    taken = queue.take()
    queue.answer([{**r, "result": {}, "error": None} for r in taken], live=["m"])
    assert queue.memory() == {"m": {"lora": LORA, "rows": 3, "width": 9}}  # 27 tokens > 20
    load = {"create": {"rank": 4}, "path": "tinker://x"}
    queue.submit([request(3, "drop_model", {}), request(4, "load_weights", load, "n")])
    taken = queue.take()
    queue.answer([{**r, "result": {}, "error": None} for r in taken], live=["n"])
    assert queue.memory() == {"n": {"lora": {"rank": 4}, "rows": 0, "width": 0}}  # m freed


def with_tinker_models(world: World, models: dict[str, RequestModel]) -> None:
    """The world's hosts report `models` (as held on each of them, read at every poll)."""
    poll = world.hosts.poll

    def poll_with(host_id: str, cursors: dict[str, int]) -> HostReport | None:
        report = poll(host_id, cursors)
        return None if report is None else {**report, "request_models": dict(models)}

    world.hosts.poll = poll_with  # type: ignore[method-assign]


def shares(tmp_path: Path) -> tuple[int, int, int, int]:
    """(the base's terms, a job's share, a busy Tinker model's, a new one's) on a tiny host."""
    probe = make_world(tmp_path / "probe")
    job = probe.job(probe.submit(max_seq_len=512))
    sizing = probe.scheduling.sizing
    shape = sizing.shape_of(job)
    return (
        sizing.base_bytes(shape),
        sizing.demand_bytes(shape, sizing.demand_of(job)),
        sizing.demand_bytes(shape, tinker_demand(BUSY["lora"], BUSY["rows"], BUSY["width"])),
        sizing.demand_bytes(shape, tinker_demand(LORA)),
    )


def test_a_job_that_fits_beside_the_jobs_waits_while_tinker_models_fill_the_host(
    tmp_path: Path,
) -> None:
    base, job, busy, _ = shares(tmp_path)
    world = make_world(
        tmp_path / "world",
        max_concurrent_runs=1,  # no second host: the job waits for room on this one
        max_slots_per_host=8,
        host_memory_bytes=base + 2 * job + busy - 1,  # two jobs, or one and the model
    )
    models: dict[str, RequestModel] = {}
    with_tinker_models(world, models)
    first = world.submit(max_seq_len=512)
    world.tick()
    host_id = world.job(first).run_id
    models["tinker-1"] = BUSY
    second = world.submit(max_seq_len=512)
    world.tick()
    world.tick()
    assert world.job(first).status == "running" and world.job(second).status == "queued"
    del models["tinker-1"]  # its session ended: its slot is freed
    world.tick()
    assert world.job(second).status == "running" and world.job(second).run_id == host_id


class Sent:
    """The dispatcher's sends, by host (no Ray: its host actors are their ids)."""

    def __init__(self, dispatcher: TinkerDispatcher) -> None:
        self.to: dict[str, list[str]] = {}
        dispatcher._host_actor = lambda host_id: host_id  # type: ignore[method-assign]
        dispatcher._send = self.send  # type: ignore[method-assign]

    def send(self, host_id: str, actor: Any, requests: list[dict[str, Any]]) -> None:
        self.to.setdefault(host_id, []).extend(r["model_id"] for r in requests)


def tinker_store(tmp_path: Path) -> TinkerStore:
    engine = make_engine(f"sqlite:///{tmp_path / 'tinker.db'}")
    migrate(engine)
    return TinkerStore(engine)


def test_a_new_tinker_model_waits_while_a_job_fills_the_warm_host(tmp_path: Path) -> None:
    base, job, _, new = shares(tmp_path)
    world = make_world(
        tmp_path / "world",
        max_concurrent_runs=1,
        warm_hosts=1,
        host_memory_bytes=base + job + new - 1,  # the job, or the new model
    )
    scheduler = Scheduler(world.settings, world.store, world.objects, NoRay(), world.hosts)  # type: ignore[arg-type]
    scheduling = scheduler.host_scheduling
    world.scheduling = scheduling
    world.tick()  # the warm host starts
    (host_id,) = world.hosts.list_hosts()
    running = world.submit(max_seq_len=512)
    world.hosts.job_steps[running] = 2
    world.tick()
    world.tick()  # the job joined it; the host's jobs are counted from here
    assert world.job(running).run_id == host_id

    store = tinker_store(tmp_path)
    dispatcher = TinkerDispatcher(
        store, lambda: dict(scheduling.reports), "unused", room=scheduler._tinker_room
    )
    sent = Sent(dispatcher)
    session = store.create_session("t1")
    created = store.create_model("t1", session, 0, "tiny", LORA)
    dispatcher.dispatch_once()
    assert sent.to == {}  # no room: its creation waits, the client hears try_again
    assert store.request("t1", created.id).state == PENDING
    assert store.model("t1", created.model_id).host_id is None

    while world.job(running).status != "succeeded":
        world.hosts.step()
        world.tick()
    world.tick()  # the job's slot is free on the host
    dispatcher.dispatch_once()
    assert sent.to == {host_id: [created.model_id]}
    assert store.model("t1", created.model_id).host_id == host_id


def test_new_tinker_models_go_to_a_warm_host_with_room_one_pass_or_many(tmp_path: Path) -> None:
    """Host `a` (first in order) is full of Tinker models; `b` has room for one new model,
    counted as soon as it is given (before any report names it): the next waits."""
    base, _, busy, new = shares(tmp_path)
    world = make_world(tmp_path / "world", host_memory_bytes=base + busy + new + new // 2)
    shape = world.scheduling.sizing.shape("tiny", world.settings.default_num_workers)
    sizing = world.scheduling.sizing

    def report(host_id: str, models: dict[str, RequestModel]) -> HostReport:
        fields = {"alive": True, "warm": True, "ending": False, "request_models": models}
        return {"host_id": host_id, "shape": shape, **fields}  # type: ignore[typeddict-item]

    full = {f"held-{i}": BUSY for i in range(2)}
    reports = {"a": report("a", full), "b": report("b", {"held-2": BUSY})}
    store = tinker_store(tmp_path)
    dispatcher = TinkerDispatcher(
        store,
        lambda: reports,
        "unused",
        room=lambda host_id, report, adding: sizing.room_for_tinker(report, [], adding),
    )
    sent = Sent(dispatcher)
    session = store.create_session("t1")
    first, second = (store.create_model("t1", session, n, "tiny", LORA) for n in (0, 1))
    dispatcher.dispatch_once()
    assert sent.to == {"b": [first.model_id]}
    assert store.request("t1", second.id).state == PENDING
    dispatcher.dispatch_once()  # `b`'s report does not name the first yet: still counted
    assert sent.to == {"b": [first.model_id]}
    reports["b"] = report("b", {})  # its Tinker model ended: room for the second
    dispatcher.dispatch_once()
    assert sent.to == {"b": [first.model_id, second.model_id]}
