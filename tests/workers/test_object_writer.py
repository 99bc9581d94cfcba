"""Objects written in parts as they arrive (ObjectStore.open_writer), on the local folder and
on a real S3 server (Ceph radosgw, multipart): whole once committed, absent before, nothing
left after an abort, and at most one part held in memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.objectstore import ObjectStore, ObjectStoreConfig, open_object_store
from core.s3_objectstore import PART_BYTES

MiB = 1024 * 1024


@pytest.fixture(params=["local", "radosgw"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return open_object_store(ObjectStoreConfig(url=str(tmp_path / "objects")))
    server = request.getfixturevalue("radosgw")
    bucket = request.getfixturevalue("s3_bucket")
    return open_object_store(
        ObjectStoreConfig(
            url=f"s3://{bucket}/writer",
            endpoint_url=server.endpoint_url,
            access_key_id=server.access_key_id,
            secret_access_key=server.secret_access_key,
        )
    )


def pieces(total: int) -> list[bytes]:
    return [bytes([n % 251]) * MiB for n in range(total // MiB)]


def test_a_streamed_object_appears_whole_only_once_committed(store: ObjectStore) -> None:
    writer = store.open_writer("files/t/big.jsonl")
    sent = pieces(12 * MiB)  # three parts on S3: two full and a last, smaller one
    for piece in sent:
        writer.write(piece)
        assert len(getattr(writer, "buffer", b"")) < PART_BYTES  # one part at most
    assert not store.exists("files/t/big.jsonl")
    writer.commit()
    assert store.get_bytes("files/t/big.jsonl") == b"".join(sent)

    small = store.open_writer("files/t/small.jsonl")  # under one part: a single PUT
    small.write(b"one\n")
    small.write(b"two\n")
    small.commit()
    assert store.get_bytes("files/t/small.jsonl") == b"one\ntwo\n"


def test_an_aborted_object_leaves_nothing(store: ObjectStore) -> None:
    writer = store.open_writer("files/t/cut.jsonl")
    for piece in pieces(11 * MiB):
        writer.write(piece)
    writer.abort()
    assert not store.exists("files/t/cut.jsonl")
    assert store.list("files/t/") == []
    s3 = getattr(store, "client", None)
    if s3 is not None:  # no multipart upload's parts left behind on the server
        uploads = s3.list_multipart_uploads(Bucket=store.bucket)  # type: ignore[attr-defined]
        assert uploads.get("Uploads", []) == []
    else:
        root = Path(store.root)  # type: ignore[attr-defined]
        assert [p for p in root.rglob("*") if p.is_file()] == []
