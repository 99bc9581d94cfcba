from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from orchestrator.settings import Settings

MAX_UPLOAD = 64 * 1024


@pytest.fixture()
def client(tmp_path: Path, tiny_base: Path) -> Iterator[TestClient]:
    """The API on embedded defaults, without the scheduler (nothing here needs Ray)."""
    settings = Settings(
        data_dir=tmp_path / "state",
        base_models={"tiny": str(tiny_base)},
        max_upload_bytes=MAX_UPLOAD,
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def upload(client: TestClient, records: list[dict], purpose: str = "fine-tune") -> dict:  # type: ignore[type-arg]
    body = "\n".join(json.dumps(r) for r in records).encode()
    response = client.post(
        "/v1/files", files={"file": ("data.jsonl", body)}, data={"purpose": purpose}
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]
