"""GET …/adapter on S3 (radosgw): a 307 to a presigned URL by default, the archive streamed
through the API with `?download=stream` (what the dashboard's fetch() uses: a cross-origin
redirect with an Authorization header fails on CORS in a browser)."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from core.object_keys import ADAPTER_FILES
from core.objectstore import CHUNK_BYTES, open_object_store
from core.publish import publish_adapter, store_adapter_archive
from orchestrator.settings import Settings
from tests.api.conftest import GOOD_RECORDS, upload
from tests.services.radosgw import RadosGW


@pytest.fixture()
def s3_client(settings: Settings, radosgw: RadosGW, s3_bucket: str) -> Iterator[TestClient]:
    on_s3 = settings.model_copy(
        update={
            "object_store": f"s3://{s3_bucket}/lorafleet",
            "s3_endpoint_url": radosgw.endpoint_url,
            "s3_access_key_id": radosgw.access_key_id,
            "s3_secret_access_key": radosgw.secret_access_key,
        }
    )
    with TestClient(create_app(on_s3)) as client:
        yield client


def succeeded_job(client: TestClient, folder: Path) -> tuple[str, dict[str, bytes]]:
    """A job taken to succeeded through the store's own transitions, its adapter published
    (and archived) by the same code the scheduler uses."""
    services = client.app.state.services  # type: ignore[attr-defined]
    file_id = upload(client, GOOD_RECORDS)["id"]  # type: ignore[arg-type]
    job_id = client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id}
    ).json()["id"]
    store = services.store
    store.queue(job_id, "queued")
    job = store.claim(job_id, 0, "run-test", "started")
    files = {name: os.urandom(3 * 1024 * 1024) for name in ADAPTER_FILES}  # > 1 chunk each
    for name, data in files.items():
        (folder / name).write_bytes(data)
    publish_adapter(services.objects, job.tenant, job_id, job.attempt, folder)
    store_adapter_archive(services.objects, job.tenant, job_id, job.attempt)
    store.succeed(job_id, job.attempt, "ft:tiny::x", "done")
    return job_id, files


def members(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return {
            m.name.rsplit("/", 1)[-1]: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def test_default_is_a_redirect_to_a_presigned_s3_url(
    s3_client: TestClient, radosgw: RadosGW, tmp_path: Path
) -> None:
    job_id, files = succeeded_job(s3_client, tmp_path)
    response = s3_client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter", follow_redirects=False)
    assert response.status_code == 307
    location = response.headers["location"]
    assert location.startswith(radosgw.endpoint_url) and "X-Amz-Signature" in location
    archive = httpx.get(location, timeout=30)  # no API key: the signature is the grant
    assert archive.status_code == 200
    got = members(archive.content)
    assert all(got[name] == data for name, data in files.items())
    assert "manifest.json" in got


def test_download_stream_sends_the_archive_through_the_api(
    s3_client: TestClient, tmp_path: Path
) -> None:
    job_id, files = succeeded_job(s3_client, tmp_path)
    response = s3_client.get(
        f"/v1/fine_tuning/jobs/{job_id}/adapter",
        params={"download": "stream"},
        follow_redirects=False,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/gzip"
    assert f'filename="{job_id}-adapter.tar.gz"' in response.headers["content-disposition"]
    got = members(response.content)
    assert all(got[name] == data for name, data in files.items())
    assert "manifest.json" in got


def test_an_unknown_download_mode_is_refused(s3_client: TestClient) -> None:
    response = s3_client.get("/v1/fine_tuning/jobs/ftjob-x/adapter", params={"download": "zip"})
    assert response.status_code in (400, 422)
    assert "download" in response.text


def test_s3_objects_stream_in_chunks(settings: Settings, radosgw: RadosGW, s3_bucket: str) -> None:
    objects = open_object_store(
        settings.model_copy(
            update={
                "object_store": f"s3://{s3_bucket}/p",
                "s3_endpoint_url": radosgw.endpoint_url,
                "s3_access_key_id": radosgw.access_key_id,
                "s3_secret_access_key": radosgw.secret_access_key,
            }
        ).object_store_config
    )
    data = os.urandom(2 * CHUNK_BYTES + 17)
    objects.put_bytes("big.bin", data)
    chunks = list(objects.iter_chunks("big.bin"))
    assert [len(c) for c in chunks] == [CHUNK_BYTES, CHUNK_BYTES, 17]
    assert b"".join(chunks) == data


def test_the_dashboard_downloads_with_download_stream(client: TestClient) -> None:
    script = client.get("/static/dashboard.js").text
    assert "/adapter?download=stream" in script
