"""Tinker models that outlive their pack host (the dispatcher's side of a move; the hosts' is
workers.host.requests and workers.host.slot_moves).

- A host that ends on purpose (a drain, an upgrade, a stop) writes each of its models' whole
  state (factors, AdamW, summed gradients) at its step boundary under the model's relocation
  prefix, frees the slot and hands back, unrun, what arrived after ("bounced"). The model then
  has no host; its next request takes it to another warm host of its base, which first
  restores it from that state, then runs its requests on in seq_id order. The client sees a
  slower call, never an error.
- A host lost without warning (its actor gone): a model whose newest saved state (its last
  move's, or a `save_state` of the client's) is still its current one, because nothing the
  client has seen changed it since, is restored from there and what was in flight runs again;
  any other fails, and its requests answer an error saying to go back to a saved state (and
  naming its newest), which the SDK raises at once (it retries only 5xx, 408, 409, 429 and
  empty 400s).
- Its host's workers restarted (a lost worker node, a crash): the host bounces what the old
  workers had taken or queued for the model and sends a `lost` notice; the model is then
  restored, or fails, as for a lost host (the same host may take it back).
A model never sent anywhere yet (its creation in flight) is simply created again elsewhere.
The seq of each model's last move is kept in memory: after a scheduler restart, a lost host's
models count only their clients' own saves.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from core.host_protocol import LOST, RELOCATE, RESTORE, HostReport
from core.object_keys import tinker_checkpoint_prefix
from orchestrator.tinker.rows import (
    DONE,
    FAILED,
    MODEL_FAILED,
    MODEL_LIVE,
    MODEL_PENDING,
    SENT,
    TinkerModelRow,
)
from orchestrator.tinker.store import TinkerStore

log = logging.getLogger("lorafleet.tinker")

RELOCATION = "relocation"  # the checkpoint id of a model's moving state
# Requests that change a model's state (a `forward` or a save changes nothing).
CHANGING = ("create_model", "forward_backward", "optim_step", "load_weights")
# Requests after which the summed gradients are empty (a save then holds the whole state).
CLEARING = ("create_model", "optim_step", "load_weights")


class RequestLike(Protocol):
    @property
    def seq_id(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def payload(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RestorePoint:
    """A saved state of a model: as it was after its request `seq`."""

    seq: int
    prefix: str
    path: str


def relocation_home(model: TinkerModelRow) -> dict[str, Any]:
    """Where the model's state goes when its host ends (the `relocate` request's payload)."""
    return {
        "prefix": tinker_checkpoint_prefix(model.tenant, model.id, RELOCATION),
        "path": f"tinker://{model.id}/{RELOCATION}",
        "base_model": model.base_model,
        "lora": model.lora,
    }


def restore_point(
    requests: Sequence[RequestLike], moved: RestorePoint | None
) -> RestorePoint | None:
    """The newest saved state of a model (`moved`: its last move's; else a client save with
    the optimizer taken while its gradients were empty), if it is still current: no request
    its client saw answered changed the model after it. None: its latest state is lost."""
    done = sorted((r for r in requests if r.state == DONE), key=lambda r: r.seq_id)
    points = [moved] if moved is not None else []
    last_changing: str | None = None
    for request in done:
        saves = request.kind == "save_weights" and request.payload.get("optimizer")
        if saves and last_changing in CLEARING:  # its gradients were empty: the whole state
            points.append(
                RestorePoint(request.seq_id, request.payload["prefix"], request.payload["path"])
            )
        if request.kind in CHANGING:
            last_changing = request.kind
    if not points:
        return None
    newest = max(points, key=lambda p: p.seq)
    if any(r.kind in CHANGING and r.seq_id > newest.seq for r in done):
        return None
    return newest


class Relocations:
    """Kept by the dispatcher: each model's restore point, and the answers of moves."""

    def __init__(self, store: TinkerStore) -> None:
        self.store = store
        self.points: dict[str, RestorePoint] = {}  # model -> where its next host restores it
        self.expecting: set[str] = set()  # models whose ending host owes a `relocate` answer

    def moves_due(self, reports: Mapping[str, HostReport]) -> dict[str, list[str]]:
        """Host id -> its models that will move now that it ends (each owes one answer,
        which its collector must fetch even when the client sends nothing meanwhile)."""
        ending = {h for h, r in reports.items() if r["ending"] or not r["alive"]}
        if not ending:
            return {}
        due: dict[str, list[str]] = {}
        for model in self.store.models((MODEL_PENDING, MODEL_LIVE)):
            if model.host_id in ending and model.id not in self.expecting:
                self.expecting.add(model.id)
                due.setdefault(model.host_id, []).append(model.id)
        return due

    def tag(self, model: TinkerModelRow, request: dict[str, Any]) -> dict[str, Any]:
        """The request, telling its host where the model's state goes if the host ends."""
        return {**request, "relocation": relocation_home(model)}

    def may_place(self, model: TinkerModelRow) -> bool:
        """Whether a model without a host may go to one now: not while a request of its is
        still out (handed back unrun, its answer not yet in)."""
        return not any(r.state == SENT for r in self.store.model_requests(model.id))

    def restore(self, model: TinkerModelRow) -> dict[str, Any]:
        """The first request on the model's next host: its slot, made from its saved state."""
        home = relocation_home(model)
        point = self.points.get(model.id)
        if point is not None:
            home = {**home, "prefix": point.prefix, "path": point.path}
        return {
            "request_id": f"restore-{model.id}",
            "model_id": model.id,
            "kind": RESTORE,
            "payload": home,
            "relocation": relocation_home(model),
        }

    def settle(self, answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Takes the answers of moves (and requests handed back unrun) out of a host's
        answers; the rest are answers to the client's requests."""
        kept: list[dict[str, Any]] = []
        for answer in answers:
            if answer.get("bounced"):
                self.store.requeue(answer["model_id"], [answer["request_id"]])
            elif answer.get("kind") == RELOCATE:
                self._moved(answer, {a["request_id"] for a in kept})
            elif answer.get("kind") == RESTORE:
                self._restored(answer)
            elif answer.get("kind") == LOST:
                for model in self.store.models((MODEL_PENDING, MODEL_LIVE)):
                    if model.id == answer["model_id"]:
                        self.host_lost(model, "when its pack host's workers restarted")
            else:
                kept.append(answer)
        return kept

    def host_lost(self, model: TinkerModelRow, how: str) -> None:
        """The model's host ended without moving it, or lost it (`how`, in its error)."""
        self.expecting.discard(model.id)
        if model.state == MODEL_PENDING:  # not made yet: made again on the next host
            self.store.requeue(model.id)
            self.store.unhost(model.id)
            return
        requests = self.store.model_requests(model.id)
        point = restore_point(requests, self.points.get(model.id))
        if point is None:
            saves = [
                r.payload["path"]
                for r in requests
                if r.state == DONE and r.kind == "save_weights" and r.payload.get("optimizer")
            ]
            newest = f" (your newest: {saves[-1]})" if saves else ""
            error = (
                f"model {model.id} was lost {how}, and no state saved "
                "since its last step was found; create a training client from your last "
                f"saved state{newest} (create_training_client_from_state_with_optimizer) "
                "to go on"
            )
            self._fail(model.id, error)
            return
        log.warning("Tinker model %s lost %s: restoring %s", model.id, how, point)
        self.points[model.id] = point
        self.store.requeue(model.id)  # what was in flight runs again after the restore
        self.store.unhost(model.id)

    # ---- answers -----------------------------------------------------------------------
    def _moved(self, answer: dict[str, Any], answered: set[str]) -> None:
        """`answered`: the requests answered just before it (their rows not yet written)."""
        model_id = answer["model_id"]
        self.expecting.discard(model_id)
        error = answer["error"]
        if error is not None:
            self._fail(model_id, f"its state could not be saved as its host ended: {error}")
            return
        # Every request that ran before the move was answered before it, in order.
        ran = [
            r.seq_id
            for r in self.store.model_requests(model_id)
            if r.state in (DONE, FAILED) or r.id in answered
        ]
        self.points[model_id] = RestorePoint(
            max(ran, default=0), answer["result"]["prefix"], answer["result"]["path"]
        )
        self.store.unhost(model_id)

    def _restored(self, answer: dict[str, Any]) -> None:
        if answer["error"] is not None:
            self._fail(answer["model_id"], f"it could not be restored: {answer['error']}")

    def _fail(self, model_id: str, error: str) -> None:
        """The model fails: its requests not answered yet answer `error` (a 4xx to the SDK,
        never retried), and so does any later one (api.tinker.common)."""
        live = {m.id for m in self.store.models((MODEL_PENDING, MODEL_LIVE))}
        if model_id not in live:
            return  # ended meanwhile: nothing of it waits
        log.warning("Tinker model %s failed: %s", model_id, error)
        self.store.set_model(model_id, MODEL_FAILED, error=error)
        self.store.fail_pending(model_id, error)
