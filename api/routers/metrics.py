"""/metrics: Prometheus exposition of the control plane's state, computed at scrape time."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from api.deps import ServicesDep
from orchestrator.states import JobStatus

router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(services: ServicesDep) -> PlainTextResponse:
    """Jobs by status (all tenants), for dashboards and alerts."""
    registry = CollectorRegistry()
    jobs = Gauge("lorafleet_jobs", "Fine-tuning jobs by status.", ["status"], registry=registry)
    counts = services.store.count_jobs_by_status()
    for status in JobStatus:
        jobs.labels(status=status.value).set(counts.get(status.value, 0))
    return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
