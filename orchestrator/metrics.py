"""The control plane's own Prometheus metrics (counters kept in this process).

They live in REGISTRY, not in prometheus_client's global one, so tests and several apps in
one process do not collide; GET /metrics adds this registry to what it exposes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

REGISTRY = CollectorRegistry()

RUN_POLL_TIMEOUTS = Counter(
    "lorafleet_run_poll_timeouts",
    "Polls of a job's run that got no answer within run_poll_timeout_seconds.",
    registry=REGISTRY,
)
