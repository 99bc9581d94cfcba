"""The Tinker dispatcher (issue 21): in the scheduler's process, a thread that moves Tinker
requests from their rows to pack hosts and their answers back.

Each pass: sessions whose heartbeat stopped end (their models' slots are dropped); a new
model goes to a warm pack host of its base with memory for it (orchestrator.tinker.room;
its creation request is its first); every other request goes to its model's host in seq_id
order, never past a gap (a request still on its way), one call per host. A pass runs as
soon as a request row commits (the store's wake-up, orchestrator.store.changes), else after
a fallback interval. While a host owes answers, a thread of its own long-polls it
(`tinker_collect`) and writes each batch of answers to their rows as they come, where the
API's `retrieve_future` hears of them. Ray is imported here only (never by the API).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from core.host_protocol import LOST, HostReport, host_actor_name
from orchestrator.tinker.relocation import Relocations
from orchestrator.tinker.room import TinkerPlacement, TinkerRoom
from orchestrator.tinker.rows import (
    MODEL_ENDED,
    MODEL_ENDING,
    MODEL_LIVE,
    MODEL_PENDING,
    TinkerModelRow,
    TinkerRequestRow,
)
from orchestrator.tinker.sampling import SampleDispatch
from orchestrator.tinker.store import TinkerStore

log = logging.getLogger("lorafleet.tinker")

# A new request row wakes a pass at once; these are the fallbacks: while samples are out
# (their answers are looked for each pass), and otherwise (a lost wake-up, a model waiting
# for a warm host).
PASS_SECONDS, IDLE_PASS_SECONDS = 0.02, 0.25
COLLECT_WAIT_SECONDS = 1.0  # one long poll of a host for answers
HEARTBEAT_CHECK_SECONDS = 2.0  # how often quiet sessions are looked for
HEARTBEAT_TIMEOUT_SECONDS = 120.0  # the SDK beats every 10 s; it warns after 120 s
CALL_TIMEOUT_SECONDS = 10.0


def ordered_batch(rows: list[TinkerRequestRow], last_handed: int) -> list[TinkerRequestRow]:
    """A model's pending rows (sorted by seq_id) that may go now: the run that continues
    `last_handed` without a gap."""
    batch = []
    expected = last_handed + 1
    for row in rows:
        if row.seq_id != expected:
            break
        batch.append(row)
        expected += 1
    return batch


def host_for(
    base_model: str,
    reports: dict[str, HostReport],
    room: Callable[[str, HostReport], bool] = lambda host_id, report: True,
) -> str | None:
    """A warm, alive host of the base that takes members (warm: it never idle-ends while a
    client thinks between requests) and has `room` for the model (orchestrator.tinker.room)."""
    for host_id, report in sorted(reports.items()):
        if (
            report["alive"]
            and report["warm"]
            and not report["ending"]
            and not report.get("exclusive", False)
            and report["shape"].base_model == base_model
            and room(host_id, report)
        ):
            return host_id
    return None


class TinkerDispatcher:
    def __init__(
        self,
        store: TinkerStore,
        reports: Callable[[], dict[str, HostReport]],
        namespace: str,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT_SECONDS,
        sampling: SampleDispatch | None = None,
        room: TinkerRoom | None = None,
    ) -> None:
        self.store = store
        self.room = room  # whether new models fit on a host's memory (None: not counted)
        self.sampling = sampling  # sampling requests to the bases' samplers, each pass
        self.reports = reports
        self.namespace = namespace
        self.heartbeat_timeout = heartbeat_timeout
        self._stop = threading.Event()
        self._wake = threading.Event()  # set: a pass now (a new request row)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the two below, shared with the collectors
        self._unanswered: dict[str, int] = {}  # host id -> requests sent, not yet answered
        self._collectors: dict[str, threading.Thread] = {}  # host id -> its answers' thread
        # Host id -> its actor, for its collector's long polls (looked up once, not per
        # poll; dropped when a call finds the actor dead, so the next looks it up by name).
        self._actors: dict[str, Any] = {}
        self._heartbeats_checked = 0.0
        self._failing = False
        self.relocations = Relocations(store)  # models moving off a host that ends

    # ---- life --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tinker-dispatch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            collectors = list(self._collectors.values())
        for thread in collectors:  # each is in a long poll of at most COLLECT_WAIT_SECONDS
            thread.join(timeout=COLLECT_WAIT_SECONDS + 1)

    def _run(self) -> None:
        with self.store.changes.on_tinker_requests(self._wake.set):
            while not self._stop.is_set():
                self._wake.clear()  # a row committed during the pass: one more pass at once
                busy = False
                try:
                    busy = self.dispatch_once()
                    self._failing = False
                except Exception:  # one bad pass must not end the loop; the next one retries
                    if not self._failing:
                        log.exception("Tinker dispatch failed; retrying")
                    self._failing = True
                    self._stop.wait(1.0)
                self._wake.wait(PASS_SECONDS if busy else IDLE_PASS_SECONDS)

    # ---- one pass ----------------------------------------------------------------------
    def dispatch_once(self) -> bool:
        """One pass; whether samples are under way (the next pass comes soon)."""
        now = time.time()
        if now - self._heartbeats_checked >= HEARTBEAT_CHECK_SECONDS:
            self._heartbeats_checked = now
            self.store.end_quiet_sessions(now - self.heartbeat_timeout)
        # Pending rows first, models second: a model's row commits before its first
        # request's, so every model a pending row names is in the models read after it (read
        # the other way round, a model created in between looked ended and its creation
        # failed).
        pending = self.store.pending_requests()
        models = self.store.models((MODEL_ENDING, MODEL_PENDING, MODEL_LIVE))  # one read
        for model in models:
            if model.state != MODEL_ENDING:
                continue
            self.store.fail_pending(model.id, "the model's session ended")
            host_id = model.host_id
            actor = None if host_id is None else self._host_actor(host_id)
            if host_id is not None and actor is not None:
                self._send(host_id, actor, [_drop(model.id)])  # its slot is freed
            self.store.set_model(model.id, MODEL_ENDED)
        for host_id, moving in self.relocations.moves_due(self.reports()).items():
            self._await_answers(host_id, len(moving))  # each model's `relocate` answer
        if pending:
            self._hand_over(pending, {m.id: m for m in models if m.state != MODEL_ENDING})
        return self.sampling.pass_once() if self.sampling is not None else False

    def _hand_over(self, pending: list[TinkerRequestRow], models: dict[str, TinkerModelRow]) -> int:
        """Sends each model's next rows to its host (`models`: the pending and live ones),
        one call per host; how many went."""
        outgoing: dict[str, list[TinkerRequestRow]] = {}
        by_model: dict[str, list[TinkerRequestRow]] = {}
        for row in pending:
            by_model.setdefault(row.model_id, []).append(row)
        handed_seqs = self.store.last_handed_seqs(list(by_model))  # one query, all models
        reports: dict[str, HostReport] | None = None
        placement = TinkerPlacement(self.room, models.values())
        for model_id, rows in by_model.items():
            model = models.get(model_id)
            if model is None:  # ended or failed: nothing of it runs any more
                self.store.fail_pending(model_id, f"model {model_id} is no longer live")
                continue
            host_id = model.host_id
            if host_id is None:
                if model.state == MODEL_LIVE and not self.relocations.may_place(model):
                    continue  # a request of it is still coming back from its last host
                reports = self.reports() if reports is None else reports
                host_id = host_for(model.base_model, reports, placement.room_for(model))
                # None up yet, none with memory for it, or the reports lag a host's end: the
                # client's future answers try_again until one is
                actor = None if host_id is None else self._host_actor(host_id)
                if host_id is None or actor is None:
                    continue
                self.store.set_model(model_id, model.state, host_id=host_id)
                placement.place(host_id, model)
                if model.state == MODEL_LIVE:  # it moved: its state goes first (relocation)
                    self._send(host_id, actor, [self.relocations.restore(model)])
            batch = ordered_batch(rows, handed_seqs[model_id])
            if not batch:
                continue
            outgoing.setdefault(host_id, []).extend(batch)
        # Each host looked up by name once a pass, right before its rows go: one that ended
        # is noticed here, before its rows are marked sent (the cached handle of the
        # collectors could be a dead actor's).
        going: list[tuple[str, Any, list[TinkerRequestRow]]] = []
        for host_id, batch in sorted(outgoing.items()):
            actor = self._host_actor(host_id)
            if actor is None:  # the host ended: its models with it
                self._host_gone(host_id)
                continue
            going.append((host_id, actor, batch))
        if not going:
            return 0
        self.store.mark_sent([row.id for _, _, batch in going for row in batch])  # one commit
        for i, (host_id, actor, batch) in enumerate(going):
            tagged = [self.relocations.tag(models[r.model_id], _request(r)) for r in batch]
            try:
                self._send(host_id, actor, tagged)
            except Exception:  # the later hosts' rows were not handed: pending again
                for row in (r for _, _, unsent in going[i + 1 :] for r in unsent):
                    self.store.requeue(row.model_id, [row.id])
                raise
        return sum(len(batch) for _, _, batch in going)

    def _host_gone(self, host_id: str) -> None:
        """A host that ended without moving its models: each is restored elsewhere from a
        current saved state, or fails (orchestrator.tinker.relocation)."""
        with self._lock:
            self._unanswered.pop(host_id, None)
            self._actors.pop(host_id, None)
        for model in self.store.models(("pending", "live")):
            if model.host_id == host_id:
                self.relocations.host_lost(model, f"with its pack host {host_id}")

    def _host_actor(self, host_id: str) -> Any | None:
        """The host's actor, looked up by name now (None: it ended); kept for its
        collector."""
        import ray

        try:
            actor = ray.get_actor(host_actor_name(host_id), namespace=self.namespace)
        except ValueError:
            with self._lock:
                self._actors.pop(host_id, None)
            return None
        with self._lock:
            self._actors[host_id] = actor
        return actor

    def _send(self, host_id: str, actor: Any, requests: list[dict[str, Any]]) -> None:
        import ray

        # Owed before the call: a call that times out is still delivered to a live actor (its
        # answers then need a collector), and one whose actor died is settled by the
        # collector finding the host gone.
        self._await_answers(host_id, len(requests))
        ray.get(actor.tinker_submit.remote(requests), timeout=CALL_TIMEOUT_SECONDS)

    def _await_answers(self, host_id: str, count: int) -> None:
        """`count` more answers are owed by the host: its collector runs until they are in."""
        with self._lock:
            self._unanswered[host_id] = self._unanswered.get(host_id, 0) + count
            if host_id not in self._collectors:
                collector = threading.Thread(
                    target=self._collect_from,
                    args=(host_id,),
                    name=f"tinker-answers-{host_id}",
                    daemon=True,
                )
                self._collectors[host_id] = collector
                collector.start()

    def _collect_from(self, host_id: str) -> None:
        """A host's collector: long-polls it for answers while it owes any, then ends (the
        next request sent there starts another)."""
        failing = False
        while True:
            with self._lock:  # under the lock that `_send` counts under: no request is missed
                if self._stop.is_set() or self._unanswered.get(host_id, 0) <= 0:
                    self._collectors.pop(host_id, None)
                    return
            try:
                self._collect(host_id)
                failing = False
            except Exception:  # the next poll retries; said once per failure
                if not failing:
                    log.exception("collecting Tinker answers from %s failed", host_id)
                failing = True
                self._stop.wait(1.0)

    def _collect(self, host_id: str) -> None:
        import ray

        with self._lock:
            actor = self._actors.get(host_id)
        if actor is None:
            actor = self._host_actor(host_id)
        if actor is None:  # the host is gone: its models with it
            self._host_gone(host_id)
            return
        try:
            answers: list[dict[str, Any]] = ray.get(
                actor.tinker_collect.remote(COLLECT_WAIT_SECONDS),
                timeout=COLLECT_WAIT_SECONDS + CALL_TIMEOUT_SECONDS,
            )
        except ray.exceptions.RayActorError:
            # Died (or unreachable): asked by name again, as each poll did before handles
            # were kept; gone, its models go with it, else the next poll retries.
            if self._host_actor(host_id) is None:
                self._host_gone(host_id)
                return
            raise
        with self._lock:  # a `lost` notice answers no request that was sent
            left = self._unanswered.get(host_id, 0) - sum(a["kind"] != LOST for a in answers)
            self._unanswered[host_id] = max(0, left)
        answers = self.relocations.settle(answers)  # moves' answers are not the client's
        self.store.finish_many(answers)  # one transaction: each future woken as it commits
        for answer in answers:
            if answer.get("kind") in ("create_model", "load_weights"):
                self.store.settle_new_model(answer["model_id"], answer["error"])


def _request(row: TinkerRequestRow) -> dict[str, Any]:
    return {
        "request_id": row.id,
        "model_id": row.model_id,
        "kind": row.kind,
        "payload": row.payload,
    }


def _drop(model_id: str) -> dict[str, Any]:
    return {
        "request_id": f"drop-{model_id}",
        "model_id": model_id,
        "kind": "drop_model",
        "payload": {},
    }
