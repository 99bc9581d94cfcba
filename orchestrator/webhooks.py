"""Webhook delivery: signed POSTs (Standard Webhooks) when a job ends, retried with backoff.

Runs in its own threads, beside the scheduler and never inside it: a slow or dead receiver
costs the scheduler nothing. Each attempt is claimed in the database first, so several
scheduler processes may run a worker each. Each POST goes only to a checked address, within
one deadline (orchestrator/webhook_http.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpcore
from sqlalchemy import Engine

from orchestrator.metrics import WEBHOOK_DELIVERIES
from orchestrator.settings import Settings
from orchestrator.store.webhooks import (
    UNREACHABLE,
    WebhookDeliveryRow,
    WebhookEndpointRow,
    WebhookStore,
)
from orchestrator.webhook_addresses import RefusedAddress, parse_networks
from orchestrator.webhook_http import Resolver, post, system_resolver

log = logging.getLogger(__name__)


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
    """Polls for due deliveries and hands each to a bounded pool of workers, at most one in
    flight per endpoint: a receiver that hangs holds one worker for one deadline, never the
    deliveries of other endpoints (or tenants)."""

    def __init__(
        self, settings: Settings, engine: Engine, resolver: Resolver = system_resolver
    ) -> None:
        self.settings = settings
        self.store = WebhookStore(engine)
        self.resolver = resolver
        self.allowed = parse_networks(settings.webhook_allowed_networks)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(settings.webhook_workers, thread_name_prefix="webhook")
        self._in_flight: set[str] = set()  # endpoint ids
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.webhook_deadline_seconds + 5)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.webhook_poll_seconds):
            try:
                self.tick()
            except Exception:  # a bad tick must not end deliveries; the next one retries
                log.exception("webhook delivery tick failed")

    def tick(self) -> None:
        """Enqueues ended jobs and starts each due delivery whose endpoint is idle, while
        a worker is free."""
        self.store.enqueue_ended_jobs()
        lease_s = self.settings.webhook_deadline_seconds * 3
        with self._lock:
            busy = set(self._in_flight)
        for delivery, endpoint in self.store.due(busy=busy):
            with self._lock:
                if len(self._in_flight) >= self.settings.webhook_workers:
                    return
                if endpoint.id in self._in_flight:
                    continue
                if not self.store.claim(delivery, lease_s=lease_s):
                    continue
                self._in_flight.add(endpoint.id)
            self._pool.submit(self._attempt_then_free, delivery, endpoint)

    def wait_idle(self, timeout: float) -> bool:
        """Waits for the deliveries in flight (tests); False if some still are."""
        end = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < end:
            time.sleep(0.02)
        return not self._in_flight

    def _attempt_then_free(
        self, delivery: WebhookDeliveryRow, endpoint: WebhookEndpointRow
    ) -> None:
        try:
            self.attempt(delivery, endpoint)
        except Exception:
            log.exception("webhook %s: delivery attempt failed", delivery.id)
        finally:
            with self._lock:
                self._in_flight.discard(endpoint.id)

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
        try:
            status_code = post(
                endpoint.url,
                body,
                headers,
                resolver=self.resolver,
                allowed=self.allowed,
                deadline_s=self.settings.webhook_deadline_seconds,
                max_body=self.settings.webhook_max_response_bytes,
            ).status_code
            outcome_class = f"{status_code // 100}xx"
        except RefusedAddress as exc:
            outcome_class = UNREACHABLE
            log.warning("webhook %s to %s refused: %s", delivery.id, endpoint.url, exc)
        except (
            httpcore.TimeoutException,
            httpcore.NetworkError,
            httpcore.ProtocolError,
            OSError,
        ) as exc:
            # The tenant is told only that it was unreachable: what the network said (refused,
            # reset, no route) would map the cluster's network for them. The log keeps it.
            outcome_class = UNREACHABLE
            log.warning(
                "webhook %s to %s: %s: %s", delivery.id, endpoint.url, type(exc).__name__, exc
            )
        delivered = outcome_class == "2xx"
        attempts = delivery.attempts + 1
        retry_at = None
        if not delivered and attempts < self.settings.webhook_max_attempts:
            retry_at = time.time() + backoff_seconds(attempts, self.settings.webhook_retry_seconds)
        self.store.record_attempt(delivery.id, status_code, outcome_class, retry_at)
        outcome = "delivered" if delivered else ("retrying" if retry_at else "failed")
        WEBHOOK_DELIVERIES.labels(outcome=outcome).inc()
