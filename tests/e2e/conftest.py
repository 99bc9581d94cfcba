"""A real `lorafleet serve` process: S3 on radosgw, the session's Ray cluster, SQLite, and
pack hosts (where every job trains)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.server_process import ServerProcess
from core.host_protocol import HOST_PREFIX
from tests.conftest import wait_for_condition
from tests.services.radosgw import RadosGW

TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class LorafleetServer(ServerProcess):
    """api.server_process.ServerProcess (the one way to start a server) on radosgw."""

    bucket: str = ""
    s3: RadosGW | None = None

    @property
    def namespace(self) -> str:
        """The Ray namespace of this server's pack hosts and runs."""
        return self.env.get("LORAFLEET_RAY_NAMESPACE", "lorafleet")

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
        # Pack hosts: a host with no job ends after a few
        # seconds here, so a test can see it end and give its CPUs back.
        "LORAFLEET_HOST_IDLE_SECONDS": "5",
        # Its own Ray namespace: pack hosts outlive a serve (detached, by design), and a
        # later module's serve on the same Ray cluster must not adopt this one's hosts.
        "LORAFLEET_RAY_NAMESPACE": bucket,
        "RAY_ADDRESS": ray_address,
    }
    server = LorafleetServer(env=env, log=folder / "server.log", bucket=bucket, s3=radosgw)
    server.start()
    yield server
    server.stop()
    end_pack_hosts(bucket)


def shared_ray_env(
    folder: Path, tiny_base: Path, ray_address: str, **settings: str
) -> dict[str, str]:
    """A serve's environment on the session's Ray: state in `folder`, the tiny Llama as
    "tiny-llama", a 0.2 s tick and a namespace of its own (it adopts no other test's hosts);
    `settings` add or override `LORAFLEET_*` settings by name."""
    settings = {
        "data_dir": str(folder / "state"),
        "base_models": json.dumps({"tiny-llama": str(tiny_base)}),
        "scheduler_poll_seconds": "0.2",
        "ray_namespace": folder.name,
        **settings,
    }
    env = LorafleetServer.with_settings(folder / "server.log", **settings).env
    return {**env, "RAY_ADDRESS": ray_address}


def tinker_key(env: dict[str, str], tenant: str = "t1") -> str:
    """A key the Tinker SDK accepts (tml-), made the way an operator makes one."""
    made = subprocess.run(
        [sys.executable, "-m", "api.cli", "keys", "create", "--tenant", tenant],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return made.stdout.strip().splitlines()[-1]


@contextmanager
def running_server(
    env: dict[str, str], folder: Path, api_key: str | None = None
) -> Iterator[LorafleetServer]:
    """A serve started with `env`, stopped after, with the pack hosts it left."""
    server = LorafleetServer(env=env, log=folder / "server.log", api_key=api_key)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        end_pack_hosts(server.namespace)


def end_pack_hosts(namespace: str) -> None:
    """Ends the pack hosts a test's serve left in its namespace (they outlive the serve)."""
    import ray

    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == namespace and entry["name"].startswith(HOST_PREFIX):
            ray.kill(ray.get_actor(entry["name"], namespace=namespace))
