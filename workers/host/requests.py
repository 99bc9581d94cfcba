"""A pack host's queue of Tinker requests (issue 21), kept by the host actor: the scheduler's
Tinker dispatcher hands requests in (in each model's seq_id order), rank 0 takes them at the
next step boundary, and their answers come back with the boundary after. No Ray, no torch.

A request is a dict: {"request_id", "model_id", "kind", "payload"} (and "relocation": where
its model's state goes if this host ends); an answer is {"request_id", "result": dict | None,
"error": str | None}.

When the host ends (a drain, an upgrade, a stop), its Tinker models move before it does: each
live model gets a `relocate` request after the work already taken (its state is written at
that step boundary and its slot freed), the host holds its end until every one is answered,
and a request that arrives for a model already moving is handed back unrun ("bounced": the
dispatcher sends it again, in order, to the model's next host).

When the workers restart (a lost worker node, a crash), the models on them are gone: the
requests they had taken and those queued for them are bounced, and each model's loss is told
(a `lost` notice) so the dispatcher restores it or fails it (orchestrator.tinker.relocation).
"""

from __future__ import annotations

import math
from typing import Any

from core.host_protocol import LOST, RELOCATE, RESTORE, RequestModel


class RequestQueue:
    """Not thread-safe: the host actor holds its lock around every call."""

    def __init__(self) -> None:
        self.queued: list[dict[str, Any]] = []
        self.answers: list[dict[str, Any]] = []
        self.models: set[str] = set()  # request-driven slots live on the workers
        self.homes: dict[str, dict[str, Any]] = {}  # model -> its relocation payload
        self.moved: set[str] = set()  # models told to relocate (they take no more work here)
        self.moving: set[str] = set()  # ... whose relocation is not answered yet
        self.running: dict[str, dict[str, Any]] = {}  # taken by the workers, not answered
        # What admission counts of each model held here (core.tinker_memory): its LoRA as
        # created, and its largest forward work so far (rows, longest datum's tokens).
        self.loras: dict[str, dict[str, Any]] = {}
        self.work: dict[str, tuple[int, int]] = {}

    def submit(self, requests: list[dict[str, Any]]) -> None:
        for request in requests:
            model_id = request["model_id"]
            if request.get("relocation") is not None:
                self.homes[model_id] = request["relocation"]
            if request["kind"] == "drop_model":  # its session ended: it never moves again
                self.homes.pop(model_id, None)
            if request["kind"] == RESTORE:
                self.moved.discard(model_id)
            self._count(request)
            if model_id in self.moved:
                self.answers.append(
                    {**_answer_of(request), "result": None, "error": None, "bounced": True}
                )
            else:
                self.queued.append(request)

    def relocations(self) -> list[dict[str, Any]]:
        """A `relocate` request for each live model not yet told to move (the host ends)."""
        moves = []
        for model_id in sorted(self.models - self.moved):
            home = self.homes.get(model_id)
            if home is None:  # never told where its state goes: it ends with the host
                continue
            self.moved.add(model_id)
            self.moving.add(model_id)
            moves.append(
                {
                    "request_id": f"relocate-{model_id}",
                    "model_id": model_id,
                    "kind": RELOCATE,
                    "payload": home,
                }
            )
        return moves

    def owes_moves(self) -> bool:
        """Whether a relocation's answer is not collected yet (the host must stay till it is)."""
        return any(a["kind"] == RELOCATE for a in self.answers)

    def holds_end(self) -> bool:
        """Whether a relocation is still under way (the workers must not leave yet)."""
        return bool(self.moving)

    def take(self) -> list[dict[str, Any]]:
        """Every queued request, in the order handed in (each model's seq_id order)."""
        taken, self.queued = self.queued, []
        self.running.update((r["request_id"], r) for r in taken)
        return taken

    def workers_lost(self) -> bool:
        """The workers restarted: their models are gone (module docstring); whether any
        answer is new."""
        lost = self.models | {r["model_id"] for r in self.running.values()} | self.moving
        if not lost:
            return False
        gone = [*self.running.values(), *(r for r in self.queued if r["model_id"] in lost)]
        for request in gone:
            self.answers.append(
                {**_answer_of(request), "result": None, "error": None, "bounced": True}
            )
        self.queued = [r for r in self.queued if r["model_id"] not in lost]
        for model_id in sorted(lost):
            self.answers.append(
                {
                    "request_id": f"lost-{model_id}",
                    "model_id": model_id,
                    "kind": LOST,
                    "result": None,
                    "error": "its pack host's workers restarted",
                }
            )
        self.moved |= lost  # what comes for them bounces until a restore
        self.models, self.moving, self.running = set(), set(), {}
        return True

    def answer(self, answers: list[dict[str, Any]], live: list[str] | None) -> None:
        self.answers.extend(answers)
        self.moving -= {a["model_id"] for a in answers if a.get("kind") == RELOCATE}
        for answer in answers:
            self.running.pop(answer["request_id"], None)
        if live is not None:
            self.models = set(live)
        held = self._held()
        self.loras = {m: lora for m, lora in self.loras.items() if m in held}
        self.work = {m: work for m, work in self.work.items() if m in held}

    def memory(self) -> dict[str, RequestModel]:
        """Each model held here (live, or with work queued or running: its creation among
        it) as admission counts it (`HostReport.request_models`)."""
        return {
            model_id: {
                "lora": dict(self.loras[model_id]),
                "rows": self.work.get(model_id, (0, 0))[0],
                "width": self.work.get(model_id, (0, 0))[1],
            }
            for model_id in sorted(self._held())
            if model_id in self.loras
        }

    def _held(self) -> set[str]:
        return self.models | {r["model_id"] for r in [*self.queued, *self.running.values()]}

    def _count(self, request: dict[str, Any]) -> None:
        """Notes a model's LoRA from the request that makes its slot, and its forward work's
        rows × longest datum when larger than any before (a malformed one is its workers'
        to answer)."""
        payload, model_id = request.get("payload") or {}, request["model_id"]
        lora = payload.get("create") if request["kind"] == "load_weights" else payload.get("lora")
        if request["kind"] in ("create_model", "load_weights", RESTORE) and lora:
            self.loras[model_id] = dict(lora)
        if request["kind"] in ("forward", "forward_backward"):
            try:
                lengths = [len(datum["tokens"]) for datum in payload["data"]]
            except (KeyError, TypeError):
                return
            work = (len(lengths), max(lengths, default=0))
            if work[0] * work[1] > math.prod(self.work.get(model_id, (0, 0))):
                self.work[model_id] = work

    def collect(self) -> list[dict[str, Any]]:
        """The answers so far (each handed out once)."""
        answers, self.answers = self.answers, []
        return answers


def _answer_of(request: dict[str, Any]) -> dict[str, Any]:
    return {k: request[k] for k in ("request_id", "model_id", "kind")}
