"""What operators see in the server log: bad requests leave no traceback there; an
unexpected error leaves its traceback exactly once (and the client a 500 in the envelope)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import GOOD_RECORDS

# The app as `lorafleet serve --no-scheduler` runs it (uvicorn's own log setup, INFO), plus
# one route that fails the way an unforeseen bug would.
SERVER = """
import logging, sys
import uvicorn
from api.app import create_app

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
app = create_app()

@app.get("/test-only/boom")
def boom() -> None:
    raise RuntimeError("an unforeseen bug")

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="info")
"""


@dataclass
class LoggedServer:
    url: str
    log: Path
    process: subprocess.Popen[bytes]

    def text(self) -> str:
        return self.log.read_text()


@pytest.fixture()
def server(tmp_path: Path, tiny_base: Path) -> Iterator[LoggedServer]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "LORAFLEET_DATA_DIR": str(tmp_path / "state"),
        "LORAFLEET_BASE_MODELS": json.dumps({"tiny": str(tiny_base)}),
        "LORAFLEET_MAX_UPLOAD_BYTES": str(1 << 20),
    }
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(port)], env=env, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    yield LoggedServer(url, log, process)
    process.terminate()
    process.wait(timeout=20)


DEEP = 100_000
BAD_UPLOADS: list[bytes] = [
    b"[" * DEEP + b"]" * DEEP,
    b'{"messages": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    b"\xff\xfe not utf-8",
    b'{"text": 1}',
    b"",
]
BAD_JOBS: list[object] = [
    {"model": "tiny", "training_file": "file-x", "lora": {"target_modules": ["__class__"]}},
    {"model": "tiny", "training_file": "file-x", "lora": {"target_modules": "everything"}},
    {"model": "nope", "training_file": "file-x"},
    {"model": "tiny", "training_file": "file-x", "seed": 2**40},
    {"model": "tiny", "training_file": "file-x", "metadata": {"k": "v" * 10_000}},
    [],
    "a string",
]


def test_bad_requests_get_a_4xx_envelope_and_leave_no_traceback(server: LoggedServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        good = "\n".join(json.dumps(r) for r in GOOD_RECORDS).encode()
        file_id = client.post(
            "/v1/files", files={"file": ("ok.jsonl", good)}, data={"purpose": "fine-tune"}
        ).json()["id"]
        answers = [
            client.post(
                "/v1/files", files={"file": ("bad.jsonl", body)}, data={"purpose": "fine-tune"}
            )
            for body in BAD_UPLOADS
        ]
        for body in BAD_JOBS:
            if isinstance(body, dict) and body.get("training_file") == "file-x":
                body = {**body, "training_file": file_id}
            answers.append(client.post("/v1/fine_tuning/jobs", json=body))
        deep_body = '{"model": "tiny", "metadata": ' + "[" * DEEP + "]" * DEEP + "}"
        answers += [
            client.post(
                "/v1/fine_tuning/jobs",
                content=deep_body,
                headers={"Content-Type": "application/json"},
            ),
            client.post(
                "/v1/fine_tuning/jobs",
                content=b"{not json",
                headers={"Content-Type": "application/json"},
            ),
            client.get("/v1/fine_tuning/jobs", params={"limit": "-1"}),
            client.get("/v1/fine_tuning/jobs/ftjob-nope/events", params={"stream": "maybe"}),
            client.get("/v1/files/file-nope/content"),
        ]
    for answer in answers:
        assert 400 <= answer.status_code < 500, (answer.request.url, answer.text)
        assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    log = server.text()
    assert "Traceback" not in log, log


def test_an_unexpected_error_is_a_500_envelope_and_one_traceback(server: LoggedServer) -> None:
    response = httpx.get(f"{server.url}/test-only/boom", timeout=30)
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert "unforeseen" not in response.text  # details stay in the log, not with the client
    # After a later request has been served, the failed one's log lines are all written.
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    log = server.text()
    assert log.count("Traceback") == 1, log
    assert "RuntimeError: an unforeseen bug" in log
    assert "/test-only/boom" in log
