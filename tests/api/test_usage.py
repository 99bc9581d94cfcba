"""GET /v1/usage (issue 21): each tenant sees its own days only, with the storage it holds;
bad dates are a 400 naming the field; /metrics shows the same usage as counters labelled
by tenant (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt

from fastapi.testclient import TestClient
from sqlalchemy.orm import sessionmaker

from core.usage import PREFILLED, SAMPLED, TRAINED
from orchestrator.usage import Usage, add_usage
from tests.api.conftest import GOOD_RECORDS, upload
from tests.api.test_tenants import bearer, keys


def test_each_tenant_sees_its_own_usage_per_day(client: TestClient) -> None:
    _, acme = keys(client).create("acme")
    _, globex = keys(client).create("globex")
    today = dt.datetime.now(dt.UTC).date()
    yesterday = (today - dt.timedelta(days=1)).isoformat()
    engine = client.app.state.services.store.engine  # type: ignore[attr-defined]
    with sessionmaker(engine).begin() as session:
        add_usage(
            session,
            "acme",
            [
                Usage(yesterday, {TRAINED: 100}, 1.5),
                Usage(today.isoformat(), {TRAINED: 10, PREFILLED: 4, SAMPLED: 6}, 0.25),
            ],
        )
        add_usage(session, "acme", [Usage(today.isoformat(), {TRAINED: 5}, 0.25)])
        add_usage(session, "globex", [Usage(today.isoformat(), {TRAINED: 999}, 9.0)])
    file_bytes = upload(TestClient(client.app, headers=bearer(acme)), GOOD_RECORDS)["bytes"]

    mine = client.get("/v1/usage", headers=bearer(acme))
    assert mine.status_code == 200, mine.text
    body = mine.json()
    assert body["tenant"] == "acme" and body["end_date"] == today.isoformat()
    assert body["storage_bytes"] == file_bytes  # its uploaded file, held now
    assert [
        (d["date"], d["tokens_trained"], d["tokens_prefilled"], d["tokens_sampled"])
        for d in body["data"]
    ] == [(yesterday, 100, 0, 0), (today.isoformat(), 15, 4, 6)]
    assert [d["device_seconds"] for d in body["data"]] == [1.5, 0.5]
    only_today = client.get(
        "/v1/usage", params={"start_date": today.isoformat()}, headers=bearer(acme)
    ).json()
    assert [d["date"] for d in only_today["data"]] == [today.isoformat()]
    theirs = client.get("/v1/usage", headers=bearer(globex)).json()
    assert [d["tokens_trained"] for d in theirs["data"]] == [999]
    assert theirs["storage_bytes"] == 0
    assert client.get("/v1/usage").status_code == 401

    for params, field in (
        ({"start_date": "2026-02-30"}, "start_date"),
        ({"end_date": "tomorrow"}, "end_date"),
        ({"start_date": today.isoformat(), "end_date": yesterday}, "start_date"),
    ):
        bad = client.get("/v1/usage", params=params, headers=bearer(acme))
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["param"] == field, bad.json()
        assert field in bad.json()["error"]["message"]

    exposition = client.get("/metrics").text
    assert 'lorafleet_tenant_tokens_total{kind="trained",tenant="acme"} 115.0' in exposition
    assert 'lorafleet_tenant_tokens_total{kind="sampled",tenant="acme"} 6.0' in exposition
    assert 'lorafleet_tenant_device_seconds_total{tenant="globex"} 9.0' in exposition
