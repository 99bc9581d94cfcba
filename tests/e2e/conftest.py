"""A real `lorafleet serve` process: S3 on radosgw, the session's Ray cluster, SQLite."""

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
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for_condition
from tests.services.radosgw import RadosGW

TERMINAL = {"succeeded", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LorafleetServer:
    env: dict[str, str]
    log: Path
    bucket: str
    s3: RadosGW
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    extra_args: tuple[str, ...] = ()

    def start(self, same_port: bool = False) -> None:
        self.port = self.port if same_port and self.port else free_port()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "api.cli",
                    "serve",
                    "--port",
                    str(self.port),
                    *self.extra_args,
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_condition(self._healthy, timeout=120, what=f"the server (log: {self.log})")

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"server exited:\n{self.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when a machine or container dies."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def wait_until_terminal(
        self, client: httpx.Client, job_id: str, timeout: float = 400
    ) -> dict[str, Any]:
        job: dict[str, Any] = {}

        def terminal() -> bool:
            nonlocal job
            job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            return job["status"] in TERMINAL

        try:
            wait_for_condition(terminal, timeout=timeout, interval=0.5, what=f"{job_id} to end")
        except AssertionError:
            raise AssertionError(f"{job}\nserver log:\n{self.log.read_text()[-4000:]}") from None
        return job

    def all_events(self, client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
        """Every event, oldest first, read through the paginated endpoint."""
        events: list[dict[str, Any]] = []
        after = None
        while True:
            params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
            page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
            events.extend(page["data"])
            if not page["has_more"]:
                return events[::-1]
            after = page["data"][-1]["id"]


def upload_model(s3: RadosGW, bucket: str, folder: Path, prefix: str) -> str:
    client = s3.client()
    for path in folder.iterdir():
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, radosgw: RadosGW, ray_address: str
) -> Iterator[LorafleetServer]:
    folder = tmp_path_factory.mktemp("server")
    bucket = f"e2e-{os.getpid()}-{int(time.time())}"
    radosgw.client().create_bucket(Bucket=bucket)
    catalog = {
        "tiny-llama": str(tiny_base),
        "tiny-llama-s3": upload_model(radosgw, bucket, tiny_base, "models/tiny-llama"),
    }
    env = {
        **os.environ,
        "LORAFLEET_DATA_DIR": str(folder / "state"),
        "LORAFLEET_OBJECT_STORE": f"s3://{bucket}/lorafleet",
        "LORAFLEET_S3_ENDPOINT_URL": radosgw.endpoint_url,
        "LORAFLEET_S3_ACCESS_KEY_ID": radosgw.access_key_id,
        "LORAFLEET_S3_SECRET_ACCESS_KEY": radosgw.secret_access_key,
        "LORAFLEET_BASE_MODELS": json.dumps(catalog),
        "LORAFLEET_SCHEDULER_POLL_SECONDS": "0.2",
        "LORAFLEET_CHECKPOINT_EVERY_STEPS": "20",
        # Partition every weight of the tiny model, so ZeRO-3 sharding is observable.
        "LORAFLEET_ZERO3_PARAM_PERSISTENCE_THRESHOLD": "0",
        "RAY_ADDRESS": ray_address,
    }
    server = LorafleetServer(env=env, log=folder / "server.log", bucket=bucket, s3=radosgw)
    server.start()
    yield server
    server.stop()
