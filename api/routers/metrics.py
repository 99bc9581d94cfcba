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
from orchestrator.metrics import REGISTRY
from orchestrator.states import JobStatus
from orchestrator.store import JobStore

router = APIRouter(tags=["operations"])


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
    Gauge("lorafleet_slots_in_use", "Jobs training now, one slot each.", registry=registry).set(
        counts.get(JobStatus.RUNNING.value, 0)
    )
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
    if token and not secrets.compare_digest(authorization or "", f"Bearer {token}"):
        raise Unauthorized("GET /metrics needs the metrics token as a Bearer token.")
    return PlainTextResponse(exposition(services.store), media_type=CONTENT_TYPE_LATEST)
