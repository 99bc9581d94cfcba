"""The per-rank memory estimate lives in `core.memory_estimate` (pure, shared with the pack
hosts that report it beside their measured peak); its names stay importable from here."""

from core.memory_estimate import (
    BaseShape,
    MemoryEstimate,
    RunShape,
    SlotDemand,
    estimate_rank_bytes,
    fits,
    host_run_shape,
    padded_tokens,
    slot_demand,
)

__all__ = [
    "BaseShape",
    "MemoryEstimate",
    "RunShape",
    "SlotDemand",
    "estimate_rank_bytes",
    "fits",
    "host_run_shape",
    "padded_tokens",
    "slot_demand",
]
