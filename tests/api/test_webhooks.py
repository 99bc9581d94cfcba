"""Webhooks: a receiver on loopback gets one verified delivery per job end (Standard Webhooks
signature), also when its first answer is a 500; deliveries are listed with their status."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from api.app import create_app
from orchestrator.api_keys import ApiKeys
from orchestrator.db import make_engine
from orchestrator.settings import Settings
from orchestrator.webhooks import WebhookDeliverer, sign
from tests.api.conftest import GOOD_RECORDS, upload
from tests.conftest import wait_for_condition


class Receiver:
    """An HTTP endpoint that answers 500 to the first request, then 204, keeping each."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.statuses = [500]
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.server.shutdown()


@pytest.fixture()
def fast_settings(settings: Settings) -> Settings:
    """Quick retries; the loopback receivers allowed as an operator allows internal ones."""
    return settings.model_copy(
        update={
            "webhook_poll_seconds": 0.1,
            "webhook_retry_seconds": 0.2,
            "webhook_allowed_networks": ["127.0.0.0/8"],
        }
    )


def ended_job(client: TestClient) -> str:
    """A job that ends at once (cancelled while it waits to be validated): no Ray needed."""
    file_id = upload(client, GOOD_RECORDS)["id"]
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id})
    assert client.post(f"/v1/fine_tuning/jobs/{job.json()['id']}/cancel").status_code == 200
    return str(job.json()["id"])


def test_each_job_end_is_delivered_once_signed_and_retried_after_a_500(
    fast_settings: Settings, receiver: Receiver
) -> None:
    with TestClient(create_app(fast_settings)) as client:
        before = ended_job(client)  # ended before the webhook existed: never announced
        endpoint = client.post("/v1/webhooks", json={"url": receiver.url}).json()
        assert endpoint["secret"].startswith("whsec_")
        jobs = {ended_job(client), ended_job(client)}

        deliverer = WebhookDeliverer(fast_settings, make_engine(fast_settings.database_url))
        deliverer.start()
        try:
            verifier = Webhook(endpoint["secret"])

            def delivered() -> dict[str, dict[str, Any]]:
                # A 500 answer is not a delivery; the retry carries the same webhook-id.
                return {
                    headers["webhook-id"]: verifier.verify(body, headers)
                    for headers, body in receiver.requests[1:]
                }

            wait_for_condition(lambda: len(delivered()) == 2, timeout=30, what="2 deliveries")
            first_headers, first_body = receiver.requests[0]
            assert verifier.verify(first_body, first_headers)["data"]["id"] in jobs
            assert first_headers["webhook-id"] in delivered()
            payloads = list(delivered().values())
            assert {p["data"]["id"] for p in payloads} == jobs
            assert all(p["type"] == "fine_tuning.job.cancelled" for p in payloads)
            assert before not in {p["data"]["id"] for p in payloads}

            # The receiver has the retry before the deliverer records its answer: wait for it.
            def listed_deliveries() -> list[dict[str, Any]]:
                url = f"/v1/webhooks/{endpoint['id']}/deliveries"
                data: list[dict[str, Any]] = client.get(url).json()["data"]
                return data

            wait_for_condition(
                lambda: {d["status"] for d in listed_deliveries()} == {"succeeded"},
                timeout=30,
                what="both deliveries recorded",
            )
            listed = listed_deliveries()
            assert sorted(d["attempts"] for d in listed) == [1, 2]
            assert {d["status"] for d in listed} == {"succeeded"}
            assert {d["last_status_class"] for d in listed} == {"2xx"}
            deliverer.tick()  # nothing new to send: no job is announced twice
            assert len(receiver.requests) == 3
        finally:
            deliverer.stop()


def test_signatures_match_the_standard_webhooks_library_and_endpoints_are_per_tenant(
    fast_settings: Settings, receiver: Receiver
) -> None:
    settings = fast_settings
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    at = datetime.fromtimestamp(1_700_000_000, tz=UTC)
    assert sign(secret, "msg_1", 1_700_000_000, b'{"a":1}') == Webhook(secret).sign(
        "msg_1", at, '{"a":1}'
    )
    assert sign(secret, "msg_1", 1_700_000_000, b'{"a":2}') != Webhook(secret).sign(
        "msg_1", at, '{"a":1}'
    )

    with TestClient(create_app(settings)) as client:
        keys = ApiKeys(make_engine(settings.database_url))
        alice = {"Authorization": f"Bearer {keys.create('alice')[1]}"}
        bob = {"Authorization": f"Bearer {keys.create('bob')[1]}"}
        made = client.post("/v1/webhooks", json={"url": receiver.url}, headers=alice).json()
        assert client.get("/v1/webhooks", headers=bob).json()["data"] == []
        assert [e["id"] for e in client.get("/v1/webhooks", headers=alice).json()["data"]] == [
            made["id"]
        ]
        deliveries = f"/v1/webhooks/{made['id']}/deliveries"
        assert client.get(deliveries, headers=bob).status_code == 404
        assert client.delete(f"/v1/webhooks/{made['id']}", headers=bob).status_code == 404
        bad = client.post("/v1/webhooks", json={"url": "not a url"}, headers=bob)
        assert bad.status_code in (400, 422)
