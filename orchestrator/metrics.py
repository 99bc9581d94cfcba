"""The control plane's own Prometheus metrics (counters kept in this process).

They live in REGISTRY, not in prometheus_client's global one, so tests and several apps in
one process do not collide; GET /metrics adds this registry to what it exposes.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from core.host_protocol import HostReport
from core.objectstore import on_store_error
from core.usage import TOKEN_KINDS

REGISTRY = CollectorRegistry()

RUN_POLL_TIMEOUTS = Counter(
    "lorafleet_run_poll_timeouts",
    "Poll timeouts missed by pack hosts: one per run_poll_timeout_seconds a host stays silent.",
    registry=REGISTRY,
)

# ---- webhooks, training progress, publishing and the API (dashboard/webhooks engineer) ----
# No per-job labels: job ids would leak across tenants and grow without bound; per-job
# figures stay in each job's events.
WEBHOOK_DELIVERIES = Counter(
    "lorafleet_webhook_deliveries",
    "Webhook delivery attempts by outcome (delivered, retrying, failed).",
    ["outcome"],
    registry=REGISTRY,
)
STEP_SECONDS = Histogram(
    "lorafleet_step_seconds",
    "Seconds per training step, from the jobs' metrics events as the scheduler stores them.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
    registry=REGISTRY,
)
FIRST_STEP_SECONDS = Histogram(
    "lorafleet_submit_to_first_step_seconds",
    "Seconds from a job's creation to its first stored training step.",
    buckets=(1, 5, 10, 20, 30, 60, 120, 300, 600),
    registry=REGISTRY,
)
TOKENS_PER_SECOND = Histogram(
    "lorafleet_tokens_per_second",
    "Training tokens per second of a job's step.",
    buckets=(10, 100, 1_000, 10_000, 100_000, 1_000_000),
    registry=REGISTRY,
)
TRAINED_STEPS = Counter(
    "lorafleet_trained_steps", "Training steps stored, all jobs.", registry=REGISTRY
)
API_SECONDS = Histogram(
    "lorafleet_api_request_seconds",
    "API latency by route template (never by raw path: ids stay out of labels).",
    ["method", "route"],
    registry=REGISTRY,
)


PUBLISH_SECONDS = Histogram(
    "lorafleet_publish_seconds",
    "Seconds to export and publish a finished job's adapter (the worker's published event).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
    registry=REGISTRY,
)
OBJECT_STORE_ERRORS = Counter(
    "lorafleet_object_store_errors",
    "Object-store transport failures in this process: retried, or gave_up after the retries.",
    ["outcome"],
    registry=REGISTRY,
)
for _outcome in ("retried", "gave_up"):  # both series exist from the start, at 0
    OBJECT_STORE_ERRORS.labels(outcome=_outcome)
on_store_error(lambda outcome, _error: OBJECT_STORE_ERRORS.labels(outcome=outcome).inc())


@dataclass(frozen=True)
class Capacity:
    """What the scheduler saw at its last tick: pack hosts by (mode, state), and
    the slots they report training a job."""

    hosts: dict[tuple[str, str], int] = field(default_factory=dict)
    slots_in_use: int = 0
    # Host shape key -> (measured peak, estimate) bytes per rank (`memory_by_shape`).
    memory: dict[str, tuple[int, int]] = field(default_factory=dict)


def memory_by_shape(reports: Iterable[HostReport]) -> dict[str, tuple[int, int]]:
    """Per host shape, the measured peak per rank of a membership and admission's estimate
    for the same jobs (workers.host.memory), from the host of that shape with the largest
    peak: both figures of one membership, so the two can be compared. By shape, not by host
    or job, so that labels stay few and name no tenant's job."""
    found: dict[str, tuple[int, int]] = {}
    for report in reports:
        memory = report["memory"]
        peak = memory.get("peak_bytes_per_rank", 0)
        if not report["alive"] or not peak:  # not measured yet (a membership's 2nd step)
            continue
        key = report["shape"].key
        if peak > found.get(key, (0, 0))[0]:
            found[key] = (peak, memory.get("estimate_bytes_per_rank", 0))
    return found


def host_memory_gauges(capacity: Capacity, registry: CollectorRegistry) -> None:
    """The hosts' memory per rank by shape, as the scheduler saw it at its last tick."""
    peak = Gauge(
        "lorafleet_host_peak_bytes_per_rank",
        "Measured peak bytes per worker of a pack host's latest membership (the largest "
        "host of each shape): live tensor bytes on CPU, the allocator's peak on GPU.",
        ["shape"],
        registry=registry,
    )
    estimate = Gauge(
        "lorafleet_host_estimate_bytes_per_rank",
        "Admission's memory estimate per worker for the same membership and host.",
        ["shape"],
        registry=registry,
    )
    for shape, (measured, estimated) in sorted(capacity.memory.items()):
        peak.labels(shape=shape).set(measured)
        estimate.labels(shape=shape).set(estimated)


def tenant_usage_counters(totals: dict[str, dict[str, float]], registry: CollectorRegistry) -> None:
    """Each tenant's usage over all days (orchestrator.usage.UsageStore.totals), as counters:
    read from the database at scrape time, so every API replica shows the same figures and
    they survive restarts. Labelled by tenant, never by job: bounded by the tenant count."""
    tokens = CounterMetricFamily(
        "lorafleet_tenant_tokens",
        "Tokens per tenant, in Tinker's units: trained (forward_backward, training steps), "
        "prefilled (forward, sampling prompts) and sampled.",
        labels=["tenant", "kind"],
    )
    seconds = CounterMetricFamily(
        "lorafleet_tenant_device_seconds",
        "Device-seconds per tenant: each pack step's time on every device, split across the "
        "pack's members by their share of the step's tokens.",
        labels=["tenant"],
    )
    for tenant, figures in sorted(totals.items()):
        for kind in TOKEN_KINDS:
            tokens.add_metric([tenant, kind], figures.get(kind, 0.0))
        seconds.add_metric([tenant], figures.get("device_seconds", 0.0))

    class _Usage(Collector):
        def collect(self) -> Iterable[Metric]:
            return [tokens, seconds]

    registry.register(_Usage())


# Keyed by the job store the scheduler shares with the API in one process (`lorafleet
# serve`), so an API replica without a scheduler, or another app in a test, sees none.
_capacity: weakref.WeakKeyDictionary[object, Capacity] = weakref.WeakKeyDictionary()


def record_capacity(store: object, capacity: Capacity) -> None:
    _capacity[store] = capacity


def last_capacity(store: object) -> Capacity | None:
    return _capacity.get(store)


def observe_training(job_created_at: int, events: list[dict[str, Any]]) -> None:
    """Adds a job's newly stored metrics events to the training histograms."""
    for event in events:
        data = event.get("data") or {}
        if event.get("type") == "published" and data.get("publish_seconds") is not None:
            PUBLISH_SECONDS.observe(data["publish_seconds"])
        # An evaluation's metrics event (workers/host/evaluating.py) is no training step.
        if event.get("type") != "metrics" or "step" not in data or "evaluation" in data:
            continue
        TRAINED_STEPS.inc()
        if data.get("step_seconds") is not None:
            STEP_SECONDS.observe(data["step_seconds"])
        if data.get("tokens_per_second") is not None:
            TOKENS_PER_SECOND.observe(data["tokens_per_second"])
        if data["step"] == 1:
            FIRST_STEP_SECONDS.observe(max(0.0, time.time() - job_created_at))
