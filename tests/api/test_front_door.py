"""The front door on both databases: the unfinished-jobs quota holds under 50 concurrent
creates, a burst past a key's rate gets 429 with Retry-After in OpenAI's envelope, open mode
serves loopback Host names only, and a non-ASCII Authorization on /metrics is a 401."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.front_door import RateLimiter, host_name
from orchestrator.errors import RateLimited
from orchestrator.settings import Settings
from tests.api.conftest import GOOD_RECORDS, serve_live, upload


def test_fifty_concurrent_creates_against_a_quota_of_two_accept_exactly_two(
    settings: Settings,
) -> None:
    quota = settings.model_copy(update={"max_active_jobs_per_tenant": 2})
    with serve_live(quota) as url, httpx.Client(base_url=url, timeout=120) as client:
        file_id = upload(client, GOOD_RECORDS)["id"]
        body = {"model": "tiny", "training_file": file_id}

        def create(_: int) -> int:
            with httpx.Client(base_url=url, timeout=120) as own:
                return own.post("/v1/fine_tuning/jobs", json=body).status_code

        with ThreadPoolExecutor(50) as pool:
            statuses = list(pool.map(create, range(50)))
        assert sorted(statuses) == [200, 200] + [429] * 48
        assert len(client.get("/v1/fine_tuning/jobs").json()["data"]) == 2


def test_a_burst_past_the_rate_gets_429_with_retry_after(settings: Settings) -> None:
    limited = settings.model_copy(update={"rate_limit_per_second": 1.0, "rate_limit_burst": 5})
    with TestClient(create_app(limited)) as client:
        statuses = [client.get("/v1/files").status_code for _ in range(8)]
        assert statuses[:5] == [200] * 5
        refused = client.get("/v1/files")
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "retry after" in error["message"]
        assert set(error) == {"message", "type", "param", "code"}
        # Another key has its own bucket.
        other = client.get("/v1/files", headers={"Authorization": "Bearer lf-other"})
        assert other.status_code == 200


def test_the_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(per_second=2.0, burst=2, clock=lambda: now[0])
    limiter.take("k")
    limiter.take("k")
    with pytest.raises(RateLimited) as refused:
        limiter.take("k")
    assert refused.value.retry_after == pytest.approx(0.5)
    now[0] = 0.5
    limiter.take("k")
    RateLimiter(per_second=0, burst=1).take("k")  # 0: no limit


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example"])
def test_open_mode_refuses_a_host_that_is_not_loopback(client: TestClient, host: str) -> None:
    refused = client.get("/v1/files", headers={"Host": host})
    assert refused.status_code == 403
    assert refused.json()["error"]["param"] == "Host"
    for loopback in ("localhost:8000", "127.0.0.1", "[::1]:9", "LOCALHOST."):
        assert client.get("/v1/files", headers={"Host": loopback}).status_code == 200


def test_once_a_key_exists_any_host_is_served_to_a_valid_key(client: TestClient) -> None:
    _, key = client.app.state.services.keys.create("acme")  # type: ignore[attr-defined]
    headers = {"Host": "api.example.com", "Authorization": f"Bearer {key}"}
    assert client.get("/v1/files", headers=headers).status_code == 200
    assert client.get("/v1/files", headers={"Host": "api.example.com"}).status_code == 401


def test_host_names_lose_their_port_and_brackets() -> None:
    assert host_name("[::1]:8000") == "::1"
    assert host_name("LocalHost.:80") == "localhost"
    assert host_name("127.0.0.1") == "127.0.0.1"


def test_a_non_ascii_authorization_on_metrics_is_a_401(tmp_path: Path, settings: Settings) -> None:
    with_token = settings.model_copy(update={"metrics_token": "s3cret"})
    with TestClient(create_app(with_token)) as client:
        for sent in ("Bearer é", "Bearer s3cret\u00e9", "\u00ff"):
            response = client.get("/metrics", headers={b"Authorization": sent.encode("latin-1")})
            assert response.status_code == 401, response.text
        ok = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
