from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from orchestrator.settings import Settings

MAX_UPLOAD = 64 * 1024
GOOD_RECORDS = [{"prompt": "1+1=", "completion": "2"}]


@pytest.fixture()
def settings(tmp_path: Path, tiny_base: Path) -> Settings:
    """Embedded defaults in a fresh folder, with the tiny base in the catalog."""
    return Settings(
        data_dir=tmp_path / "state",
        base_models={"tiny": str(tiny_base)},
        max_upload_bytes=MAX_UPLOAD,
    )


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


@pytest.fixture()
def live_server(settings: Settings) -> Iterator[str]:
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
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
