"""Whether a new Tinker model fits on a pack host (issue 21): by the rule a job's admission
follows (core.tinker_memory, orchestrator.scheduling.sizing), counting the host's jobs, the
Tinker models its report names, and those the dispatcher has given it since that report
(their creation on its way: a burst of `create_model` calls must not overfill one host
between two reports). A model that fits on no warm host of its base waits, and its client's
future answers `try_again` meanwhile, as when no warm host is up."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from core.host_protocol import HostReport
from core.memory_estimate import SlotDemand
from core.tinker_memory import tinker_demand
from orchestrator.tinker.rows import TinkerModelRow

# (host id, its report, the Tinker models to add) -> whether they fit there
# (the scheduler's: `HostSizing.room_for_tinker` with the host's jobs).
TinkerRoom = Callable[[str, HostReport, Sequence[SlotDemand]], bool]


class TinkerPlacement:
    """One dispatch pass's placement of new Tinker models by memory. `models`: the pending
    and live models read this pass (their hosts as the store has them)."""

    def __init__(self, room: TinkerRoom | None, models: Iterable[TinkerModelRow]) -> None:
        self.room = room  # None: memory is not counted (every host has room)
        self.given: dict[str, dict[str, dict[str, Any]]] = {}  # host -> model -> its LoRA
        for model in models:
            if model.host_id is not None:
                self.given.setdefault(model.host_id, {})[model.id] = model.lora

    def room_for(self, model: TinkerModelRow) -> Callable[[str, HostReport], bool]:
        """Whether `model` fits on a host (a `host_for` test)."""

        def fits(host_id: str, report: HostReport) -> bool:
            if self.room is None:
                return True
            named = report.get("request_models") or {}
            unreported = [
                tinker_demand(lora)
                for model_id, lora in sorted(self.given.get(host_id, {}).items())
                if model_id not in named and model_id != model.id
            ]
            return self.room(host_id, report, [*unreported, tinker_demand(model.lora)])

        return fits

    def place(self, host_id: str, model: TinkerModelRow) -> None:
        """`model` was given to this host: counted there for the rest of the pass."""
        self.given.setdefault(host_id, {})[model.id] = model.lora
