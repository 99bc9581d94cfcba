"""Webhooks cannot reach inside the network: refused addresses at registration (400 naming
url) and after DNS resolution at each delivery (a resolver stub; every listener is on
loopback, no traffic leaves this machine); a receiver that trickles or streams forever holds
one worker for one deadline and never another tenant's delivery."""

from __future__ import annotations

import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from orchestrator.api_keys import ApiKeys
from orchestrator.db import make_engine
from orchestrator.settings import Settings
from orchestrator.webhooks import WebhookDeliverer
from tests.api.conftest import GOOD_RECORDS, serve_live
from tests.conftest import wait_for_condition

CHUNK = b"x" * 65536


class Listener:
    """A raw loopback HTTP listener: answers 204, trickles its headers one byte at a time
    forever, or streams a body forever; it counts connections and what it sent."""

    def __init__(self, behaviour: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.behaviour = behaviour
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.sent = 0
        self.requests: list[bytes] = []
        self.sock = socket.create_server((host, port))
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            self.requests.append(request)
            if self.behaviour == "ok":
                conn.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            elif self.behaviour == "trickle":
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                while not self.closed:
                    conn.sendall(b"a")
                    self.sent += 1
                    time.sleep(0.1)
            else:  # stream: a 200 whose body never ends
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n")
                while not self.closed:
                    conn.sendall(CHUNK)
                    self.sent += len(CHUNK)
        except OSError:
            pass  # the deliverer hung up: what these listeners exist to see
        finally:
            self.open_now -= 1
            conn.close()

    def close(self) -> None:
        self.closed = True
        self.sock.close()


@pytest.fixture()
def listeners() -> Iterator[Callable[..., Listener]]:
    made: list[Listener] = []

    def make(behaviour: str, host: str = "127.0.0.1", port: int = 0) -> Listener:
        made.append(Listener(behaviour, host, port))
        return made[-1]

    yield make
    for listener in made:
        listener.close()


def end_a_job(client: TestClient, headers: dict[str, str] | None = None) -> str:
    """A job that ends at once (cancelled before it is validated): no Ray needed."""
    body = json.dumps(GOOD_RECORDS[0]).encode()
    file = client.post(
        "/v1/files",
        files={"file": ("data.jsonl", body)},
        data={"purpose": "fine-tune"},
        headers=headers,
    )
    assert file.status_code == 200, file.text
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny", "training_file": file.json()["id"]},
        headers=headers,
    )
    assert job.status_code == 200, job.text
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job.json()['id']}/cancel", headers=headers)
    assert cancelled.status_code == 200
    return str(job.json()["id"])


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://127.1/",
        "http://2130706433/",
        "http://0x7f.1/",
        "http://0177.0.0.1/",
        "http://localhost:8000/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://10.0.0.8/",
        "http://192.168.1.1/",
        "http://172.31.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "http://[fe80::1]/",
        "http://100.64.1.1/",
        "http://224.0.0.251/",
        "http://[ff02::1]/",
        "http://0.0.0.0/",
        "http://[::]/",
    ],
)
def test_a_refused_address_is_a_400_naming_url_at_registration(
    client: TestClient, url: str
) -> None:
    response = client.post("/v1/webhooks", json={"url": url})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "url"
    assert client.get("/v1/webhooks").json()["data"] == []


def test_public_urls_register_and_an_over_long_one_is_a_400(client: TestClient) -> None:
    made = client.post("/v1/webhooks", json={"url": "https://hooks.example.com/x"})
    assert made.status_code == 200, made.text
    long = client.post("/v1/webhooks", json={"url": "https://example.com/" + "a" * 3000})
    assert long.status_code == 400
    assert long.json()["error"]["param"] == "url"


def test_a_tenant_has_at_most_the_endpoint_cap(settings: Settings) -> None:
    capped = settings.model_copy(update={"max_webhooks_per_tenant": 2})
    with TestClient(create_app(capped)) as client:
        for n in range(2):
            url = f"https://hooks.example.com/{n}"
            assert client.post("/v1/webhooks", json={"url": url}).status_code == 200
        third = client.post("/v1/webhooks", json={"url": "https://hooks.example.com/3"})
        assert third.status_code == 429
        assert third.json()["error"]["param"] == "url"


def test_concurrent_registrations_never_pass_the_endpoint_cap(settings: Settings) -> None:
    capped = settings.model_copy(update={"max_webhooks_per_tenant": 2})
    with serve_live(capped) as url:

        def register(n: int) -> int:
            with httpx.Client(base_url=url, timeout=120) as client:
                hook = {"url": f"https://hooks.example.com/{n}"}
                return client.post("/v1/webhooks", json=hook).status_code

        with ThreadPoolExecutor(20) as pool:
            statuses = sorted(pool.map(register, range(20)))
        assert statuses == [200, 200] + [429] * 18
        assert len(httpx.get(f"{url}/v1/webhooks").json()["data"]) == 2


def test_a_name_that_resolves_or_rebinds_to_a_refused_address_is_never_connected(
    settings: Settings, listeners: Callable[..., Listener]
) -> None:
    """The operator allows 127.0.0.2 (an internal receiver). `hooks.test` first resolves
    there, then rebinds to 127.0.0.1, where a listener on the same port waits: it is never
    connected to, and the tenant reads only `unreachable`."""
    allowed = listeners("ok", "127.0.0.2")
    forbidden = listeners("ok", "127.0.0.1", allowed.port)
    answers = {"hooks.test": ["127.0.0.2"]}
    asked: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return answers[host]

    hooks = settings.model_copy(
        update={"webhook_allowed_networks": ["127.0.0.2/32"], "webhook_retry_seconds": 60}
    )
    with TestClient(create_app(hooks)) as client:
        url = f"http://hooks.test:{allowed.port}/hook"
        endpoint = client.post("/v1/webhooks", json={"url": url}).json()
        deliverer = WebhookDeliverer(hooks, make_engine(hooks.database_url), resolver=resolver)
        try:
            end_a_job(client)
            deliverer.tick()
            assert deliverer.wait_idle(30)
            assert len(allowed.requests) == 1
            # Connected to the checked address, the name kept for the Host header.
            assert f"host: hooks.test:{allowed.port}".encode() in allowed.requests[0].lower()

            answers["hooks.test"] = ["127.0.0.1"]  # rebinding after registration
            end_a_job(client)
            deliverer.tick()
            assert deliverer.wait_idle(30)
            answers["hooks.test"] = ["127.0.0.2", "10.0.0.1"]  # one bad address is enough
            end_a_job(client)
            deliverer.tick()
            assert deliverer.wait_idle(30)
        finally:
            deliverer.stop()
        listed = client.get(f"/v1/webhooks/{endpoint['id']}/deliveries").json()["data"]
    assert forbidden.connections == 0
    assert len(allowed.requests) == 1
    assert sorted(d["last_status_class"] for d in listed) == ["2xx", "unreachable", "unreachable"]
    for failed in (d for d in listed if d["status"] != "succeeded"):
        assert failed["status"] == "pending" and failed["next_attempt_at"] is not None
        assert "127.0.0.1" not in str(failed) and "10.0.0.1" not in str(failed)
    assert asked.count("hooks.test") == 3


def test_a_receiver_that_trickles_or_streams_forever_holds_no_other_tenants_delivery(
    settings: Settings, listeners: Callable[..., Listener]
) -> None:
    trickle, stream, ok = listeners("trickle"), listeners("stream"), listeners("ok")
    hooks = settings.model_copy(
        update={
            "webhook_allowed_networks": ["127.0.0.0/8"],
            "webhook_deadline_seconds": 1.5,
            "webhook_retry_seconds": 60,
            "webhook_workers": 3,
        }
    )
    with TestClient(create_app(hooks)) as client:
        keys = ApiKeys(make_engine(hooks.database_url))
        tenants: dict[str, dict[str, str]] = {}
        for name, listener in (("slow", trickle), ("flood", stream), ("fine", ok)):
            headers = {"Authorization": f"Bearer {keys.create(name)[1]}"}
            url = f"http://127.0.0.1:{listener.port}/hook"
            made = client.post("/v1/webhooks", json={"url": url}, headers=headers)
            assert made.status_code == 200, made.text
            tenants[name] = headers
        for name, headers in tenants.items():
            for _ in range(2 if name == "slow" else 1):
                end_a_job(client, headers)

        deliverer = WebhookDeliverer(hooks, make_engine(hooks.database_url))
        tracemalloc.start()
        try:
            deliverer.tick()
            wait_for_condition(lambda: len(ok.requests) == 1, timeout=30, what="fine's POST")
            # Delivered while the trickling receiver still holds its own attempt open.
            assert trickle.open_now == 1
            assert deliverer.wait_idle(60)  # the deadline ends the trickle and the stream
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            deliverer.stop()
    assert trickle.connections == 1 and trickle.most_open == 1  # one in flight per endpoint
    # The endless body was read up to the cap only, then hung up on.
    assert stream.sent < 64 * 1024 * 1024
    assert peak < 8 * 1024 * 1024, peak
