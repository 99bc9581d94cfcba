"""Uploads are read as they arrive: a body past the limit is cut off with 413 (the rest is
never read), one file part only, nothing listed until the file is whole, nothing left in the
store by a refused upload or a repeated Idempotency-Key."""

from __future__ import annotations

import contextlib
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import IntegrityError

from api.multipart_upload import FORM_BYTES
from core.objectstore import open_object_store
from orchestrator.db import make_engine, migrate
from orchestrator.files import FileUpload, commit_file
from orchestrator.idempotency import IdempotencyKeys
from orchestrator.settings import Settings
from orchestrator.store import JobStore
from orchestrator.tables import FileRow
from tests.api.conftest import MAX_UPLOAD

BOUNDARY = "lorafleet-test-boundary"
LINE = json.dumps({"prompt": "1+1=", "completion": "2"}).encode() + b"\n"


def part_head(name: str, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()


def multipart(*parts: tuple[str, str | None, bytes]) -> bytes:
    body = b"".join(part_head(n, f) + data + b"\r\n" for n, f, data in parts)
    return body + f"--{BOUNDARY}--\r\n".encode()


def raw_request(port: int, head_only: bytes) -> socket.socket:
    """Opens a connection and sends a chunked upload's request line and headers."""
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(
        b"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        + f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n".encode()
    )
    send_chunk(conn, head_only)
    return conn


def send_chunk(conn: socket.socket, data: bytes) -> None:
    conn.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")


def objects_in(settings: Settings) -> list[Path]:
    root = Path(settings.object_store)
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_a_body_past_the_limit_is_cut_off_with_413_and_never_read_to_its_end(
    live_server: str, settings: Settings
) -> None:
    port = int(live_server.rsplit(":", 1)[1])
    conn = raw_request(port, part_head("purpose") + b"fine-tune\r\n" + part_head("file", "a.jsonl"))
    conn.settimeout(30)
    sent, answer = 0, b""
    endless = LINE * 4096  # ~150 KiB a chunk, of valid lines: nothing but the size is wrong
    try:
        while sent < 256 * 1024 * 1024:  # far past the limit, if the server kept reading
            send_chunk(conn, endless)
            sent += len(endless)
    except OSError:
        pass  # the server answered and closed the connection: it stopped reading
    with contextlib.suppress(OSError):
        answer = conn.recv(65536)
    conn.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"param":"file"' in answer
    assert sent < 64 * 1024 * 1024  # socket buffers aside, it stopped at the limit
    assert objects_in(settings) == []  # the part already written was removed
    assert httpx.get(f"{live_server}/v1/files").json()["data"] == []


def test_a_declared_length_past_the_limit_is_refused_before_reading(live_server: str) -> None:
    port = int(live_server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.settimeout(30)
        conn.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Content-Length: {MAX_UPLOAD + FORM_BYTES + 1}\r\n".encode()
            + f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n".encode()
        )
        assert conn.recv(65536).startswith(b"HTTP/1.1 413")


def test_a_file_is_listed_only_once_it_is_whole(live_server: str) -> None:
    port = int(live_server.rsplit(":", 1)[1])
    conn = raw_request(port, part_head("purpose") + b"fine-tune\r\n" + part_head("file", "a.jsonl"))
    send_chunk(conn, LINE * 100)
    # Half sent: not a file yet (and no other request waits for it).
    assert httpx.get(f"{live_server}/v1/files").json()["data"] == []
    send_chunk(conn, LINE * 100 + f"\r\n--{BOUNDARY}--\r\n".encode())
    conn.sendall(b"0\r\n\r\n")
    conn.settimeout(30)
    answer = conn.recv(65536)
    conn.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    (listed,) = httpx.get(f"{live_server}/v1/files").json()["data"]
    assert listed["bytes"] == len(LINE) * 200


def post_raw(client: TestClient, body: bytes, **headers: str) -> Any:
    return client.post(
        "/v1/files",
        content=body,
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", **headers},
    )


def test_one_file_part_and_every_malformed_body_is_a_400_leaving_nothing(
    client: TestClient, settings: Settings
) -> None:
    two_files = multipart(("purpose", None, b"fine-tune"), ("file", "a", LINE), ("file", "b", LINE))
    no_file = multipart(("purpose", None, b"fine-tune"))
    no_purpose = multipart(("file", "a.jsonl", LINE))
    bad_purpose = multipart(("purpose", None, b"x" * 10_000), ("file", "a.jsonl", LINE))
    long_name = multipart(("purpose", None, b"fine-tune"), ("file", "a" * 600, LINE))
    cut_short = multipart(("purpose", None, b"fine-tune"), ("file", "a.jsonl", LINE))[:-30]
    many_parts = multipart(*((f"f{i}", None, b"1") for i in range(20)), ("file", "a", LINE))
    bad_lines = multipart(("purpose", None, b"fine-tune"), ("file", "a.jsonl", b"{\n" * 50))
    for body, param in [
        (two_files, "file"),
        (no_file, "file"),
        (no_purpose, "purpose"),
        (bad_purpose, "purpose"),
        (long_name, "file"),
        (cut_short, "file"),
        (many_parts, "file"),
        (bad_lines, "file"),
    ]:
        response = post_raw(client, body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param, response.text
    assert client.get("/v1/files").json()["data"] == []
    assert objects_in(settings) == []


def test_a_repeated_idempotency_key_stores_one_object(
    client: TestClient, settings: Settings
) -> None:
    body = multipart(("purpose", None, b"fine-tune"), ("file", "a.jsonl", LINE * 3))
    first = post_raw(client, body, **{"Idempotency-Key": "k1"})
    again = post_raw(client, body, **{"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    assert len(objects_in(settings)) == 1
    other = multipart(("purpose", None, b"fine-tune"), ("file", "a.jsonl", LINE * 4))
    assert post_raw(client, other, **{"Idempotency-Key": "k1"}).status_code == 422
    assert len(objects_in(settings)) == 1


def test_concurrent_uploads_with_one_idempotency_key_leave_one_object(
    live_server: str, settings: Settings
) -> None:
    body = multipart(("purpose", None, b"fine-tune"), ("file", "a.jsonl", LINE * 50))

    def send(_: int) -> str:
        response = httpx.post(
            f"{live_server}/v1/files",
            content=body,
            headers={
                "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                "Idempotency-Key": "same",
            },
            timeout=120,
        )
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(send, range(8)))
    assert len(ids) == 1
    assert len(objects_in(settings)) == 1  # the losers' objects were removed


def test_an_object_whose_row_cannot_be_added_is_removed(settings: Settings) -> None:
    """A database insert that fails (here: the id is taken) leaves no object behind."""
    store = JobStore(make_engine(settings.database_url))
    migrate(store.engine)
    objects = open_object_store(settings.object_store_config)
    keys = IdempotencyKeys(store.engine)

    def uploaded() -> FileRow:
        upload = FileUpload(objects, "acme", max_bytes=MAX_UPLOAD, max_lines=100)
        upload.feed(LINE * 3)
        return upload.row("a.jsonl", "fine-tune", upload.finish())

    def render(row: FileRow) -> dict[str, object]:
        return {"id": row.id}

    first = uploaded()
    commit_file(store, objects, keys, first, None, render)
    second = uploaded()
    second.id = first.id  # the insert fails on the primary key
    with pytest.raises(IntegrityError):
        commit_file(store, objects, keys, second, None, render)
    assert objects.exists(first.object_key)
    assert not objects.exists(second.object_key)
    assert len(objects_in(settings)) == 1
