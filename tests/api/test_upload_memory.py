"""What an upload costs the server (long: it sends 2 GiB and 400 MiB): a 2 GiB upload is cut
at the limit with 413 while the server's temp folder and RSS grow by a few MiB at most, and
a 400 MiB valid upload succeeds with RSS bounded. Prints its figures (pytest -s).

Run: pytest -m long -s tests/api/test_upload_memory.py
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from pathlib import Path

import psutil
import pytest

from api.server_process import ServerProcess

pytestmark = pytest.mark.long
MiB = 1024 * 1024
LIMIT = 512 * MiB  # the default LORAFLEET_MAX_UPLOAD_BYTES
BOUNDARY = "lorafleet-memory"
LINE = json.dumps({"prompt": "p" * 400, "completion": "c" * 600}).encode() + b"\n"


class PeakRss:
    """Samples a process's RSS every 20 ms from a thread; `peak` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def send_upload(port: int, total: int) -> tuple[bytes, int]:
    """A chunked upload of `total` bytes of valid lines; returns the answer and how much
    the server took before it answered (or the whole, if it read it all)."""
    conn = socket.create_connection(("127.0.0.1", port))
    conn.settimeout(600)
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"'
        "\r\n\r\n"
    ).encode()
    conn.sendall(
        b"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        + f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n".encode()
    )
    block = LINE * (MiB // len(LINE))

    def chunk(data: bytes) -> None:
        conn.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    sent = 0
    try:
        chunk(head)
        while sent + len(block) <= total:
            chunk(block)
            sent += len(block)
        chunk(f"\r\n--{BOUNDARY}--\r\n".encode())
        conn.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # answered and closed: the server stopped reading
    answer = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in answer:
            got = conn.recv(65536)
            if not got:
                break
            answer += got
    conn.close()
    return answer, sent


def test_upload_costs_a_bounded_buffer_not_the_file(tmp_path: Path) -> None:
    temp = tmp_path / "server-tmp"
    temp.mkdir()
    server = ServerProcess.with_settings(tmp_path / "server.log", data_dir=str(tmp_path / "d"))
    server.env["TMPDIR"] = str(temp)
    server.extra_args = ("--no-scheduler",)
    with server:
        answer, _ = send_upload(server.port, 4 * MiB)  # warm: imports, first allocations
        assert answer.startswith(b"HTTP/1.1 200"), answer
        pid = server.process.pid  # type: ignore[union-attr]
        base_rss = psutil.Process(pid).memory_info().rss
        base_temp = folder_bytes(temp)
        objects_root = tmp_path / "d" / "objects"
        base_objects = folder_bytes(objects_root)

        sampler = PeakRss(pid)
        answer, sent = send_upload(server.port, 2048 * MiB)
        cut_peak = sampler.stop()
        cut_temp = folder_bytes(temp) - base_temp
        left = folder_bytes(objects_root) - base_objects
        assert answer.startswith(b"HTTP/1.1 413"), answer

        sampler = PeakRss(pid)
        answer, valid = send_upload(server.port, 400 * MiB)
        valid_peak = sampler.stop()
        assert answer.startswith(b"HTTP/1.1 200"), answer
        valid_temp = folder_bytes(temp) - base_temp

    figures = {
        "baseline_rss_mib": round(base_rss / MiB, 1),
        "cut_2gib_sent_before_413_mib": round(sent / MiB, 1),
        "cut_2gib_rss_growth_mib": round((cut_peak - base_rss) / MiB, 1),
        "cut_2gib_temp_growth_mib": round(cut_temp / MiB, 2),
        "cut_2gib_objects_left_mib": round(left / MiB, 2),
        "valid_400mib_rss_growth_mib": round((valid_peak - base_rss) / MiB, 1),
        "valid_400mib_temp_growth_mib": round(valid_temp / MiB, 2),
    }
    print("upload memory:", json.dumps(figures))
    assert sent <= LIMIT + 64 * MiB  # cut at the limit (socket buffers aside)
    assert cut_temp < 4 * MiB and valid_temp < 4 * MiB
    assert left == 0  # the cut upload's part was removed
    assert cut_peak - base_rss < 48 * MiB
    assert valid_peak - base_rss < 48 * MiB
