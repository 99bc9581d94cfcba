"""Webhook delivery: signed POSTs (Standard Webhooks) when a job ends, retried with backoff.

Runs in its own thread, beside the scheduler and never inside it: a slow or dead receiver
costs the scheduler nothing. Each attempt is claimed in the database first, so several
scheduler processes may run a worker each.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time

import httpx
from sqlalchemy import Engine

from orchestrator.metrics import WEBHOOK_DELIVERIES
from orchestrator.settings import Settings
from orchestrator.store.webhooks import WebhookDeliveryRow, WebhookEndpointRow, WebhookStore

log = logging.getLogger(__name__)
ATTEMPT_TIMEOUT_S = 10.0


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: HMAC-SHA256 over "id.timestamp.body" with the
    base64 key after "whsec_", as the Standard Webhooks spec says."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def backoff_seconds(attempts: int, base_s: float) -> float:
    """Doubling waits: base, 2·base, 4·base, …, at most an hour."""
    return float(min(base_s * 2 ** max(0, attempts - 1), 3600.0))


class WebhookDeliverer:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.store = WebhookStore(engine)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.http = httpx.Client(timeout=ATTEMPT_TIMEOUT_S)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=ATTEMPT_TIMEOUT_S + 5)
        self.http.close()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.webhook_poll_seconds):
            try:
                self.tick()
            except Exception:  # a bad tick must not end deliveries; the next one retries
                log.exception("webhook delivery tick failed")

    def tick(self) -> None:
        self.store.enqueue_ended_jobs()
        for delivery, endpoint in self.store.due():
            if self.store.claim(delivery, lease_s=ATTEMPT_TIMEOUT_S * 3):
                self.attempt(delivery, endpoint)

    def attempt(self, delivery: WebhookDeliveryRow, endpoint: WebhookEndpointRow) -> None:
        body = json.dumps(delivery.payload, separators=(",", ":")).encode()
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(endpoint.secret, delivery.id, timestamp, body),
        }
        status_code: int | None = None
        error: str | None = None
        try:
            status_code = self.http.post(endpoint.url, content=body, headers=headers).status_code
            if not 200 <= status_code < 300:
                error = f"the receiver answered {status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        attempts = delivery.attempts + 1
        retry_at = None
        if error and attempts < self.settings.webhook_max_attempts:
            retry_at = time.time() + backoff_seconds(attempts, self.settings.webhook_retry_seconds)
        self.store.record_attempt(delivery.id, status_code, error, retry_at)
        outcome = "delivered" if error is None else ("retrying" if retry_at else "failed")
        WEBHOOK_DELIVERIES.labels(outcome=outcome).inc()
        if error:
            log.warning("webhook %s to %s: %s (%s)", delivery.id, endpoint.url, error, outcome)
