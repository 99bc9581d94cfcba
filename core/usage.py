"""Usage per tenant (issue 21), in Tinker's units: tokens trained, prefilled and sampled, and
device-seconds. Pure arithmetic shared by the pack host (which measures and splits) and the
control plane (which adds each measured share to the tenant's day, once).

A pass through the shared base takes `seconds` of wall time on every one of the host's
`devices` (ranks): `seconds * devices` device-seconds, split across the members in that
pass by their share of its tokens. Torch-free and Ray-free.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

TRAINED, PREFILLED, SAMPLED = "trained", "prefilled", "sampled"
TOKEN_KINDS = (TRAINED, PREFILLED, SAMPLED)
# What a Tinker request of each kind does with its data's tokens (others: none).
REQUEST_TOKEN_KINDS = {"forward_backward": TRAINED, "forward": PREFILLED}


def split_device_seconds(
    seconds: float, devices: int, tokens: Mapping[str, int]
) -> dict[str, float]:
    """`seconds` of wall time on `devices` devices, split across the members by their share
    of `tokens`; the shares add up to `seconds * devices`. Members with no tokens share
    nothing, unless no member has any (then they share equally: the pass still ran)."""
    if not tokens:
        return {}
    total = seconds * devices
    counted = sum(max(0, n) for n in tokens.values())
    if counted == 0:
        return {member: total / len(tokens) for member in tokens}
    return {member: total * max(0, n) / counted for member, n in tokens.items()}


def request_tokens(kind: str, payload: Mapping[str, Any]) -> dict[str, int]:
    """The tokens a Tinker request for a pack host spends: every token of every datum
    (`forward_backward`: trained; `forward`: prefilled); {} for the other kinds."""
    token_kind = REQUEST_TOKEN_KINDS.get(kind)
    if token_kind is None:
        return {}
    return {token_kind: sum(len(d.get("tokens") or ()) for d in payload.get("data") or ())}


def sample_tokens(result: Mapping[str, Any] | None) -> dict[str, int]:
    """A sampler's answer's tokens: the prompt prefilled once (its n sequences share it),
    and every sampled token of every sequence. {} for an answer that is an error."""
    if not result or "choices" not in result:
        return {}
    sampled = sum(len(c.get("tokens") or ()) for c in result["choices"])
    return {PREFILLED: int(result.get("prompt_tokens") or 0), SAMPLED: sampled}


def utc_day(timestamp: float) -> str:
    """The UTC day ("YYYY-MM-DD") a usage record counts in: the day it was measured."""
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).date().isoformat()
