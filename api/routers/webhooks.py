"""/v1/webhooks: a tenant's endpoints (each with its signing secret) and their deliveries."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import AnyHttpUrl, BaseModel, Field, UrlConstraints

from api.deps import ServicesDep, TenantDep
from api.schemas import ErrorResponse, ListPage
from orchestrator.errors import InvalidRequest
from orchestrator.store.webhooks import WebhookDeliveryRow, WebhookEndpointRow, WebhookStore
from orchestrator.webhook_addresses import RefusedAddress, check_url, parse_networks

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 422, 429)
}
MAX_URL_CHARS = 2048  # the database column's length


class WebhookCreate(BaseModel):
    url: Annotated[AnyHttpUrl, UrlConstraints(max_length=MAX_URL_CHARS)] = Field(
        description="http(s) URL of a receiver outside the cluster: loopback, private, "
        "link-local, CGNAT, multicast, unspecified and metadata addresses are refused, here "
        "and again after DNS resolution at each delivery (an operator may allow internal "
        "networks with LORAFLEET_WEBHOOK_ALLOWED_NETWORKS)."
    )


class WebhookEndpoint(BaseModel):
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    id: str
    url: str
    created_at: int
    # Shown on creation only: receivers verify each delivery with it (Standard Webhooks).
    secret: str | None = None


class WebhookDelivery(BaseModel):
    object: Literal["webhook_delivery"] = "webhook_delivery"
    id: str
    job_id: str
    event_type: str
    status: str
    attempts: int
    # 2xx, 3xx, 4xx, 5xx, or unreachable: never what the network said (no port-scan oracle).
    last_status_class: str | None
    last_error: str | None
    next_attempt_at: int | None = Field(description="When it is retried (pending only).")
    created_at: int
    delivered_at: int | None
    payload: dict[str, Any]


def get_webhook_store(request: Request) -> WebhookStore:
    return WebhookStore(request.app.state.services.store.engine)


WebhooksDep = Annotated[WebhookStore, Depends(get_webhook_store)]


def _endpoint(row: WebhookEndpointRow, with_secret: bool = False) -> WebhookEndpoint:
    return WebhookEndpoint(
        id=row.id,
        url=row.url,
        created_at=row.created_at,
        secret=row.secret if with_secret else None,
    )


def _delivery(row: WebhookDeliveryRow) -> WebhookDelivery:
    return WebhookDelivery(
        id=row.id,
        job_id=row.job_id,
        event_type=row.event_type,
        status=row.status,
        attempts=row.attempts,
        last_status_class=row.last_status_class,
        last_error=row.last_error,
        next_attempt_at=int(row.next_attempt_at) if row.status == "pending" else None,
        created_at=row.created_at,
        delivered_at=row.delivered_at,
        payload=row.payload,
    )


@router.post("", response_model=WebhookEndpoint, responses=ERRORS)
def create(
    webhooks: WebhooksDep, services: ServicesDep, tenant: TenantDep, body: WebhookCreate
) -> WebhookEndpoint:
    """Register a URL; each job of yours that ends from now on is POSTed to it, signed with
    the returned secret (HMAC-SHA256, `webhook-id`/`webhook-timestamp`/`webhook-signature`
    headers as in Standard Webhooks), retried with backoff until it answers 2xx. Each
    delivery has a total deadline; a tenant has at most LORAFLEET_MAX_WEBHOOKS_PER_TENANT
    endpoints (429 past it)."""
    settings = services.settings
    url = str(body.url)
    try:
        check_url(url, parse_networks(settings.webhook_allowed_networks))
    except RefusedAddress as exc:
        raise InvalidRequest(f"url: {exc}", param="url", code="invalid_url") from exc
    row = webhooks.add_endpoint(tenant, url, settings.max_webhooks_per_tenant)
    return _endpoint(row, with_secret=True)


@router.get("", response_model=ListPage[WebhookEndpoint], responses=ERRORS)
def list_endpoints(webhooks: WebhooksDep, tenant: TenantDep) -> ListPage[WebhookEndpoint]:
    rows = webhooks.list_endpoints(tenant)
    return ListPage[WebhookEndpoint](data=[_endpoint(r) for r in rows], has_more=False)


@router.delete("/{endpoint_id}", response_model=WebhookEndpoint, responses=ERRORS)
def delete(webhooks: WebhooksDep, tenant: TenantDep, endpoint_id: str) -> WebhookEndpoint:
    return _endpoint(webhooks.delete_endpoint(tenant, endpoint_id))


@router.get("/{endpoint_id}/deliveries", response_model=ListPage[WebhookDelivery], responses=ERRORS)
def deliveries(
    webhooks: WebhooksDep, tenant: TenantDep, endpoint_id: str
) -> ListPage[WebhookDelivery]:
    """Newest first, each with its status (pending, succeeded, failed) and last attempt."""
    rows = webhooks.list_deliveries(tenant, endpoint_id)
    return ListPage[WebhookDelivery](data=[_delivery(r) for r in rows], has_more=False)
