"""200 job submissions from 8 concurrent clients while `lorafleet serve` is killed with
SIGKILL and restarted three times: every acknowledged job exists afterwards, none twice.
Clients retry what got no answer with the same Idempotency-Key, as a careful client does."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import LorafleetServer
from tests.services.radosgw import RadosGW

pytestmark = [pytest.mark.slow, pytest.mark.faults]
CLIENTS, PER_CLIENT, RESTARTS = 8, 25, 3


@pytest.fixture()
def api_only(tmp_path: Path, tiny_base: Path, radosgw: RadosGW) -> Iterator[LorafleetServer]:
    env = {
        **os.environ,
        "LORAFLEET_DATA_DIR": str(tmp_path / "state"),
        "LORAFLEET_BASE_MODELS": json.dumps({"tiny": str(tiny_base)}),
        "LORAFLEET_MAX_ACTIVE_JOBS_PER_TENANT": "1000",  # nothing runs here: all stay queued
    }
    server = LorafleetServer(
        env=env, log=tmp_path / "server.log", bucket="", s3=radosgw, extra_args=("--no-scheduler",)
    )
    server.start()
    yield server
    server.stop()


def test_no_acknowledged_job_is_lost_or_doubled_across_kills(api_only: LorafleetServer) -> None:
    with api_only.client() as client:
        body = json.dumps({"prompt": "1+1=", "completion": "2"}).encode()
        file_id = client.post(
            "/v1/files", files={"file": ("d.jsonl", body)}, data={"purpose": "fine-tune"}
        ).json()["id"]
    acknowledged: dict[str, str] = {}  # idempotency key -> job id
    lock = threading.Lock()

    def submit_all(client_no: int) -> int:
        retries = 0
        for n in range(PER_CLIENT):
            key = f"client{client_no}-job{n}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    response = httpx.post(
                        f"{api_only.url}/v1/fine_tuning/jobs",
                        json={"model": "tiny", "training_file": file_id, "seed": n},
                        headers={"Idempotency-Key": key},
                        timeout=10,
                    )
                    if response.status_code == 200:
                        with lock:
                            assert (
                                acknowledged.setdefault(key, response.json()["id"])
                                == response.json()["id"]
                            )
                        break
                    assert response.status_code == 409, response.text  # first try still open
                except httpx.TransportError:
                    pass
                retries += 1
                assert time.monotonic() < deadline, f"{key} never got through"
                time.sleep(0.1)
        return retries

    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        futures = [pool.submit(submit_all, c) for c in range(CLIENTS)]
        for _ in range(RESTARTS):
            time.sleep(1.0)
            api_only.kill()
            api_only.start(same_port=True)
        retries = sum(f.result() for f in futures)

    assert len(acknowledged) == CLIENTS * PER_CLIENT
    with api_only.client() as client:
        stored, after = [], None
        while True:
            params = {"limit": 100, **({"after": after} if after else {})}
            page = client.get("/v1/fine_tuning/jobs", params=params).json()
            stored += [j["id"] for j in page["data"]]
            if not page["has_more"]:
                break
            after = page["data"][-1]["id"]
    assert len(stored) == len(set(stored)) == CLIENTS * PER_CLIENT
    assert set(stored) == set(acknowledged.values())
    assert retries > 0, "the kills never interrupted a client; the test proved nothing"
