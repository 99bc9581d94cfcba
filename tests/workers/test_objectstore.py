"""One contract, two backends: the local folder and a real S3 server (Ceph radosgw) over HTTP."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from core.object_keys import MANIFEST, adapter_key
from core.objectstore import (
    LocalObjectStore,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreConfig,
    open_object_store,
)
from core.publish import PublishError, publish_adapter, verify_adapter
from tests.services import radosgw as radosgw_service


@pytest.fixture(params=["local", "radosgw"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return open_object_store(ObjectStoreConfig(url=str(tmp_path / "objects")))
    server = request.getfixturevalue("radosgw")
    bucket = request.getfixturevalue("s3_bucket")
    return open_object_store(
        ObjectStoreConfig(
            url=f"s3://{bucket}/some/prefix",
            endpoint_url=server.endpoint_url,
            access_key_id=server.access_key_id,
            secret_access_key=server.secret_access_key,
        )
    )


def test_round_trip_list_and_delete(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("files/t/a.jsonl", b"one")
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 40_000)  # ~10 MiB: multipart on S3
    store.put_file("files/t/b.bin", big)
    store.put_bytes("other/c", b"three")
    assert store.get_bytes("files/t/a.jsonl") == b"one"
    assert b"".join(store.iter_chunks("files/t/b.bin", 1 << 20)) == big.read_bytes()
    assert store.list("files/") == ["files/t/a.jsonl", "files/t/b.bin"]
    store.download("files/t/b.bin", tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == big.read_bytes()
    assert store.exists("other/c") and not store.exists("other/d")
    store.delete("other/c")
    assert not store.exists("other/c")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("other/c")
    with pytest.raises(ObjectNotFound):
        store.download("other/c", tmp_path / "missing")
    with pytest.raises(ObjectNotFound):
        store.iter_chunks("other/c")


def test_keys_cannot_escape_the_store(store: ObjectStore) -> None:
    with pytest.raises(ValueError, match="escapes"):
        store.put_bytes("../outside", b"x")


def test_presigned_urls_are_given_only_where_they_work(store: ObjectStore) -> None:
    store.put_bytes("files/t/p.txt", b"presigned")
    url = store.presigned_url("files/t/p.txt", expires_s=60)
    if isinstance(store, LocalObjectStore):
        assert url is None
        return
    assert url is not None
    with urllib.request.urlopen(url) as response:  # noqa: S310 - a loopback test server
        assert response.read() == b"presigned"


def write_adapter(folder: Path) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    return folder


def test_publish_writes_the_manifest_last_and_verify_catches_tampering(
    store: ObjectStore, tmp_path: Path
) -> None:
    manifest = publish_adapter(store, "t", "ftjob-1", 1, write_adapter(tmp_path / "a"))
    assert manifest.files["adapter_model.safetensors"]["size"] == 1000
    assert verify_adapter(store, "t", "ftjob-1", 1) == manifest
    store.put_bytes(adapter_key("t", "ftjob-1", 1, "adapter_model.safetensors"), b"\0" * 999)
    with pytest.raises(PublishError, match="does not match"):
        verify_adapter(store, "t", "ftjob-1", 1)
    store.delete(adapter_key("t", "ftjob-1", 1, MANIFEST))
    with pytest.raises(PublishError, match="no manifest"):
        verify_adapter(store, "t", "ftjob-1", 1)


def test_presigned_urls_name_the_public_endpoint_and_work_there(
    radosgw: radosgw_service.RadosGW, s3_bucket: str
) -> None:
    # The servers know the store by one name, the API's clients by another (compose: s3:9000
    # inside, 127.0.0.1:9000 outside): the URL is signed for the clients' name.
    internal = radosgw.endpoint_url
    public = internal.replace("127.0.0.1", "localhost")
    assert public != internal
    store = open_object_store(
        ObjectStoreConfig(
            url=f"s3://{s3_bucket}/p",
            endpoint_url=internal,
            access_key_id=radosgw.access_key_id,
            secret_access_key=radosgw.secret_access_key,
            public_endpoint_url=public,
        )
    )
    store.put_bytes("files/t/p.txt", b"public")
    url = store.presigned_url("files/t/p.txt", expires_s=60)
    assert url is not None and url.startswith(public + "/")
    with urllib.request.urlopen(url) as response:  # noqa: S310 - a loopback test server
        assert response.read() == b"public"
