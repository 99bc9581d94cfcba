"""/v1/webhooks: a tenant's endpoints (each with its signing secret) and their deliveries."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import AnyHttpUrl, BaseModel

from api.deps import TenantDep
from api.schemas import ErrorResponse, ListPage
from orchestrator.store.webhooks import WebhookDeliveryRow, WebhookEndpointRow, WebhookStore

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 422)
}


class WebhookCreate(BaseModel):
    url: AnyHttpUrl


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
    last_status_code: int | None
    last_error: str | None
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
        last_status_code=row.last_status_code,
        last_error=row.last_error,
        created_at=row.created_at,
        delivered_at=row.delivered_at,
        payload=row.payload,
    )


@router.post("", response_model=WebhookEndpoint, responses=ERRORS)
def create(webhooks: WebhooksDep, tenant: TenantDep, body: WebhookCreate) -> WebhookEndpoint:
    """Register a URL; each job of yours that ends from now on is POSTed to it, signed with
    the returned secret (HMAC-SHA256, `webhook-id`/`webhook-timestamp`/`webhook-signature`
    headers as in Standard Webhooks), retried with backoff until it answers 2xx."""
    return _endpoint(webhooks.add_endpoint(tenant, str(body.url)), with_secret=True)


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
