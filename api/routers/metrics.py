"""/metrics: Prometheus exposition of the control plane: job counts computed at scrape time,
plus this process's own counters and histograms (orchestrator.metrics.REGISTRY)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from api.deps import ServicesDep
from orchestrator.errors import Unauthorized
from orchestrator.metrics import (
    REGISTRY,
    host_memory_gauges,
    last_capacity,
    tenant_usage_counters,
)
from orchestrator.states import JobStatus
from orchestrator.store import JobStore
from orchestrator.usage import UsageStore

router = APIRouter(tags=["operations"])
# Series shown at 0 when nothing is in that state, so dashboards see them from the start.
HOST_SERIES = [("hosts", "busy"), ("hosts", "idle"), ("hosts", "ending")]


def job_gauges(store: JobStore) -> bytes:
    """Jobs by status, queue depth and slots in use (all tenants, no job ids)."""
    registry = CollectorRegistry()
    jobs = Gauge("lorafleet_jobs", "Fine-tuning jobs by status.", ["status"], registry=registry)
    counts = store.count_jobs_by_status()
    for status in JobStatus:
        jobs.labels(status=status.value).set(counts.get(status.value, 0))
    Gauge("lorafleet_queue_depth", "Jobs waiting for a run (queued).", registry=registry).set(
        counts.get(JobStatus.QUEUED.value, 0)
    )
    capacity = last_capacity(store)
    Gauge(
        "lorafleet_slots_in_use",
        "Slots training a job, as the hosts and runs reported them at the scheduler's last "
        "tick (in a process without a scheduler: jobs running).",
        registry=registry,
    ).set(capacity.slots_in_use if capacity else counts.get(JobStatus.RUNNING.value, 0))
    if capacity is not None:  # only a process that runs the scheduler has seen the hosts
        hosts = Gauge(
            "lorafleet_hosts",
            "Pack hosts (mode hosts) by state (busy, idle, ending, unresponsive) at the "
            "scheduler's last tick.",
            ["mode", "state"],
            registry=registry,
        )
        for mode, state in sorted(set(HOST_SERIES) | set(capacity.hosts)):
            hosts.labels(mode=mode, state=state).set(capacity.hosts.get((mode, state), 0))
        host_memory_gauges(capacity, registry)
    tenant_usage_counters(UsageStore(store.engine).totals(), registry)
    return generate_latest(registry)


def exposition(store: JobStore) -> bytes:
    return job_gauges(store) + generate_latest(REGISTRY)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(
    services: ServicesDep,
    authorization: Annotated[str | None, Header(description="Bearer <metrics token>")] = None,
) -> PlainTextResponse:
    """For dashboards and alerts. With LORAFLEET_METRICS_TOKEN set, a scraper must send
    `Authorization: Bearer <token>`."""
    token = services.settings.metrics_token
    # As bytes: compare_digest refuses a str with non-ASCII characters (TypeError, a 500).
    sent = (authorization or "").encode("utf-8", "surrogateescape")
    if token and not secrets.compare_digest(sent, f"Bearer {token}".encode()):
        raise Unauthorized("GET /metrics needs the metrics token as a Bearer token.")
    return PlainTextResponse(exposition(services.store), media_type=CONTENT_TYPE_LATEST)
