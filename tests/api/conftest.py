from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from orchestrator.settings import Settings

MAX_UPLOAD = 64 * 1024
GOOD_RECORDS = [{"prompt": "1+1=", "completion": "2"}]


@pytest.fixture()
def settings(tmp_path: Path, tiny_base: Path, database_url: str) -> Settings:
    """Embedded defaults in a fresh folder, with the tiny base in the catalog, on SQLite
    and again on PostgreSQL (`database_url`): every API test runs on both databases."""
    return Settings(
        data_dir=tmp_path / "state",
        database_url=database_url,
        base_models={"tiny": str(tiny_base)},
        max_upload_bytes=MAX_UPLOAD,
    )


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """`database_url` for a module's shared server (the fuzz runs): SQLite, then PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'lorafleet.db'}"
    server = request.getfixturevalue("postgres")
    return str(server.create_database(f"m_{secrets.token_hex(6)}"))


@pytest.fixture()
def client(settings: Settings) -> Iterator[TestClient]:
    """The API without the scheduler (nothing here needs Ray)."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def upload(client: httpx.Client, records: list[dict], purpose: str = "fine-tune") -> dict:  # type: ignore[type-arg]
    body = "\n".join(json.dumps(r) for r in records).encode()
    response = client.post(
        "/v1/files", files={"file": ("data.jsonl", body)}, data={"purpose": purpose}
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


@contextmanager
def serve_live(settings: Settings) -> Iterator[str]:
    """The API served over real HTTP by uvicorn in a thread (no scheduler: nothing trains)."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture()
def live_server(settings: Settings) -> Iterator[str]:
    with serve_live(settings) as url:
        yield url
