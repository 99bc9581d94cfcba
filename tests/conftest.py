"""Shared fixtures: one tiny base model, one Ray cluster, one radosgw, one PostgreSQL per session.

With CI=true a missing service is a failure; elsewhere the tests that need it skip and say
what to install.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.services import postgres as postgres_service
from tests.services import radosgw as radosgw_service

if TYPE_CHECKING:
    from orchestrator.tables import JobRow

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Weights & Biases runs (a job's `integrations`) are written to disk, never sent: set before
# the session's Ray starts, so its pack hosts inherit it.
os.environ.setdefault("WANDB_MODE", "offline")
# Starlette's TestClient sends `Host: testserver`: an in-process name, served in open mode
# beside the loopback names (production serves loopback names only).
os.environ.setdefault(
    "LORAFLEET_OPEN_MODE_HOSTS", '["localhost", "127.0.0.1", "::1", "testserver"]'
)
IN_CI = os.environ.get("CI", "").lower() == "true"


def require(missing: str | None) -> None:
    """Fails in CI, skips elsewhere, when a service this test needs cannot run here."""
    if missing is None:
        return
    if IN_CI:
        pytest.fail(f"CI must provide this: {missing}")
    pytest.skip(missing)


def wait_for_condition(
    condition: Callable[[], bool], timeout: float = 60, interval: float = 0.2, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")


def job_row(**columns: Any) -> JobRow:
    """A job as a new submission stores it (validating its files, tenant t1, model tiny);
    `columns` set any of its columns."""
    from orchestrator.states import JobStatus
    from orchestrator.store import new_id, now
    from orchestrator.tables import JobRow

    new: dict[str, Any] = {
        "id": new_id("ftjob"),
        "tenant": "t1",
        "model": "tiny",
        "training_file": "file-x",
        "seed": 1,
        "status": JobStatus.VALIDATING_FILES.value,
        "attempt": 0,
        "created_at": now(),
        "settings": {},
        "event_cursor": 0,
    }
    return JobRow(**{**new, **columns})


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.tiny_base import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="session")
def radosgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[radosgw_service.RadosGW]:
    require(radosgw_service.missing())
    server = radosgw_service.start_radosgw(tmp_path_factory.mktemp("radosgw"))
    yield server
    server.stop()


@pytest.fixture()
def s3_bucket(radosgw: radosgw_service.RadosGW) -> str:
    """A fresh bucket per test, so tests never see each other's objects."""
    name = f"test-{secrets.token_hex(6)}"
    radosgw.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def postgres() -> Iterator[postgres_service.Postgres]:
    require(postgres_service.missing())
    server = postgres_service.start_postgres()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lorafleet.db'}"
    server: postgres_service.Postgres = request.getfixturevalue("postgres")
    return server.create_database(f"t_{secrets.token_hex(6)}")


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One local Ray cluster for the session; servers under test join it by address.

    Every node of it is this machine, so the session's temp folder (base models, local
    object stores) is the same folder on each: said in LORAFLEET_SHARED_PATHS, which the
    servers and settings made from here inherit (a cluster refuses other local folders:
    orchestrator.cluster_settings)."""
    import ray

    ray.init(
        address="local",  # always a new cluster, never one found running on the machine
        num_cpus=4,
        include_dashboard=False,
        namespace="lorafleet",
        log_to_driver=False,
    )
    before = os.environ.get("LORAFLEET_SHARED_PATHS")
    os.environ["LORAFLEET_SHARED_PATHS"] = json.dumps([str(tmp_path_factory.getbasetemp())])
    yield ray.get_runtime_context().gcs_address
    if before is None:
        os.environ.pop("LORAFLEET_SHARED_PATHS", None)
    else:
        os.environ["LORAFLEET_SHARED_PATHS"] = before
    ray.shutdown()
