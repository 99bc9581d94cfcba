"""Key lookups are remembered for a second on a replica: a revoke made elsewhere (the CLI,
another replica) takes effect within that second; one made through the app at once.
Requests waiting for the same key share one database lookup."""

from __future__ import annotations

import asyncio
import time

import pytest
from fastapi.testclient import TestClient

from api.deps import TENANT_CACHE_SECONDS, CachedApiKeys
from orchestrator.api_keys import ApiKeys
from orchestrator.errors import Unauthorized
from tests.conftest import wait_for_condition


def test_a_key_revoked_by_another_process_stops_working_within_a_second(
    client: TestClient,
) -> None:
    app_keys = client.app.state.services.keys  # type: ignore[attr-defined]
    _, key = app_keys.create("acme")
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/fine_tuning/jobs", headers=headers).status_code == 200
    # What `lorafleet keys revoke` does: its own ApiKeys on the same database.
    ApiKeys(app_keys.sessions.kw["bind"]).revoke(key)
    revoked_at = time.monotonic()
    wait_for_condition(
        lambda: client.get("/v1/fine_tuning/jobs", headers=headers).status_code == 401,
        timeout=TENANT_CACHE_SECONDS + 2,
        interval=0.05,
        what="the revoked key to be refused",
    )
    assert time.monotonic() - revoked_at < TENANT_CACHE_SECONDS + 0.5


def test_the_first_key_closes_an_open_server_at_once(client: TestClient) -> None:
    assert client.get("/v1/fine_tuning/jobs").status_code == 200
    client.app.state.services.keys.create("acme")  # type: ignore[attr-defined]
    assert client.get("/v1/fine_tuning/jobs").status_code == 401


def test_requests_waiting_for_the_same_key_share_one_lookup(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    app_keys: CachedApiKeys = client.app.state.services.keys  # type: ignore[attr-defined]
    _, key = app_keys.create("acme")
    _, other = app_keys.create("globex")
    lookups: list[str] = []
    looked_up = ApiKeys.tenant_for

    def slow_lookup(self: ApiKeys, authorization: str | None) -> str:
        lookups.append(authorization or "")
        time.sleep(0.2)  # long enough for every request below to wait on it
        return looked_up(self, authorization)

    monkeypatch.setattr(ApiKeys, "tenant_for", slow_lookup)

    async def many() -> list[str]:
        headers = [f"Bearer {key}"] * 20 + [f"Bearer {other}"] * 5
        return await asyncio.gather(*(app_keys.tenant_for_request(h) for h in headers))

    tenants = asyncio.run(many())
    assert tenants == ["acme"] * 20 + ["globex"] * 5
    assert sorted(lookups) == sorted([f"Bearer {key}", f"Bearer {other}"])  # one per key
    with pytest.raises(Unauthorized):  # a bad key's error reaches every waiter
        asyncio.run(app_keys.tenant_for_request("Bearer nope"))
