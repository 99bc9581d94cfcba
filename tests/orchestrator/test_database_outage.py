"""A database that goes away: the API answers 503 with Retry-After (not 500), the scheduler
rides it out (its ticks fail, it logs once, it retries), and once the database is back,
writes work again at once and nothing acknowledged before the outage is lost. A real
PostgreSQL of this test's own, stopped (immediate) and started again."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from core.objectstore import open_object_store
from orchestrator.scheduling.ray_connection import RayConnection
from orchestrator.scheduling.scheduler import Scheduler
from orchestrator.settings import Settings
from orchestrator.store import JobStore
from tests.conftest import require
from tests.services import postgres as postgres_service


@pytest.fixture()
def own_postgres() -> Iterator[postgres_service.Postgres]:
    """Not the session's server: this test stops it."""
    require(postgres_service.missing())
    server = postgres_service.start_postgres()
    yield server
    server.stop()


def pg_ctl(server: postgres_service.Postgres, *args: str) -> None:
    argv = [str(server.bindir / "pg_ctl"), "-D", str(server.datadir), "-w", "-t", "60", *args]
    subprocess.run(
        postgres_service._as_service_user(argv), check=True, capture_output=True, timeout=90
    )


def stop_immediately(server: postgres_service.Postgres) -> None:
    pg_ctl(server, "-m", "immediate", "stop")


def start_again(server: postgres_service.Postgres) -> None:
    options = (
        f"-c listen_addresses=127.0.0.1 -p {server.port} -k {server.basedir / 'sock'} -c fsync=off"
    )
    pg_ctl(server, "-l", str(server.basedir / "postgres.log"), "-o", options, "start")


def upload(client: TestClient, name: str) -> Any:  # TestClient's response type
    body = b'{"prompt": "1+1=", "completion": "2"}\n'
    return client.post("/v1/files", files={"file": (name, body)}, data={"purpose": "fine-tune"})


@pytest.mark.slow
@pytest.mark.faults
def test_the_api_answers_503_and_the_scheduler_rides_out_a_database_outage(
    own_postgres: postgres_service.Postgres,
    ray_address: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = own_postgres.create_database("outage")
    # Acknowledged means durable: the test server's default (synchronous_commit=off) could
    # lose the last commits to an immediate stop, which is not what this test is about.
    own_postgres.psql("ALTER DATABASE outage SET synchronous_commit = on")
    settings = Settings(data_dir=tmp_path, database_url=url, ray_address=ray_address)
    with TestClient(create_app(settings)) as client:
        before = upload(client, "before.jsonl")
        assert before.status_code == 200, before.text
        store: JobStore = client.app.state.services.store  # type: ignore[attr-defined]
        scheduler = Scheduler(
            settings,
            store,
            open_object_store(settings.object_store_config),
            RayConnection(settings),
        )
        assert scheduler.tick_safely()

        stop_immediately(own_postgres)
        for response in (client.get("/v1/files"), upload(client, "during.jsonl")):
            assert response.status_code == 503, response.text
            assert int(response.headers["Retry-After"]) > 0
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("server_error", "service_unavailable")
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="orchestrator.scheduling.scheduler"):
            assert not scheduler.tick_safely()
            assert not scheduler.tick_safely()
        outage_logs = [r for r in caplog.records if "database unavailable" in r.getMessage()]
        assert len(outage_logs) == 1  # once per outage, not once per tick

        start_again(own_postgres)
        after = upload(client, "after.jsonl")  # the first request after the restart
        assert after.status_code == 200, after.text
        listed = {f["id"] for f in client.get("/v1/files").json()["data"]}
        assert {before.json()["id"], after.json()["id"]} <= listed
        assert len(listed) == 2  # the upload refused with 503 left no row behind
        assert scheduler.tick_safely()
