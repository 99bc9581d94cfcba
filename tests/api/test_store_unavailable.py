"""An object store that is away (a real radosgw, stopped) answers 503 with Retry-After on
the API, as a database outage does, instead of a 500; requests work again once it is back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from orchestrator.settings import Settings
from tests.services.radosgw import RadosGW

BODY = b'{"prompt": "1+1=", "completion": "2"}\n'


@pytest.mark.faults
def test_an_upload_while_the_store_is_away_is_a_503_with_retry_after(
    tmp_path: Path, radosgw: RadosGW, s3_bucket: str
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        object_store=f"s3://{s3_bucket}/lorafleet",
        s3_endpoint_url=radosgw.endpoint_url,
        s3_access_key_id=radosgw.access_key_id,
        s3_secret_access_key=radosgw.secret_access_key,
    )

    def upload(client: TestClient) -> Any:  # TestClient's response type
        files = {"file": ("a.jsonl", BODY)}
        return client.post("/v1/files", files=files, data={"purpose": "fine-tune"})

    with TestClient(create_app(settings)) as client:
        try:
            radosgw.stop_gateway()
            response = upload(client)
        finally:
            radosgw.start_gateway()
        assert response.status_code == 503, response.text
        assert int(response.headers["Retry-After"]) > 0
        assert response.json()["error"]["code"] == "service_unavailable"
        again = upload(client)
        assert again.status_code == 200, again.text
