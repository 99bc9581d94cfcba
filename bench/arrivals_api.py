"""The arrivals stream through the API, as a client sees it (bench/arrivals.py's `api-embedded`
and `api-split` modes): real `lorafleet` processes on the bench's Ray cluster, one warm pack
host, jobs submitted over HTTP and each followed on its live event stream (SSE).

  api-embedded  one `serve` (API and scheduler in one process, SQLite)
  api-split     `serve --no-scheduler` (an API replica) + `lorafleet scheduler`, PostgreSQL
                (started as the tests start it: tests/services/postgres.py)

Per job: submit → its first step as the host stamped it (the metrics event's own time) and
submit → that event *received* on the stream by the client, which is what the wake-ups
between the parts shorten (orchestrator.store.changes, `PackHosts.wait_for_news`).

`api` is not imported here: run as `bench/arrivals.py`, this folder's own api.py would
shadow the package. The processes are started with `-m api.cli` from the repository.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Seen:
    submitted: float
    first_step: float | None = None  # the host's stamp of its first step
    first_seen: float | None = None  # when the client read that event from the stream
    done: float | None = None
    status: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """The lorafleet processes of one topology, started from `code` (a source tree)."""

    def __init__(self, folder: Path, env: dict[str, str], code: Path) -> None:
        self.folder, self.env, self.code = folder, env, code
        self.running: list[subprocess.Popen[bytes]] = []
        self.port = 0

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        name = args[0] + ("-replica" if "--no-scheduler" in args else "")
        log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115 - the process's log
        env = {**self.env, "PYTHONPATH": str(self.code)}
        process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", *args], env=env, cwd=self.code, stdout=log, stderr=log
        )
        self.running.append(process)
        return process

    def serve(self, *extra: str) -> str:
        self.port = free_port()
        self.start("serve", "--port", str(self.port), *extra)
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"serve did not start: {self.folder}")

    def stop(self) -> None:
        for process in self.running:
            process.terminate()
        for process in self.running:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def follow(url: str, job_id: str, seen: Seen) -> None:
    """Reads the job's live stream until it ends, noting its first metrics event."""
    path = f"{url}/v1/fine_tuning/jobs/{job_id}/events"
    with (
        httpx.Client(timeout=httpx.Timeout(600, connect=10)) as client,
        client.stream("GET", path, params={"stream": "true"}) as response,
    ):
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            event = json.loads(line[len("data: ") :])
            if event["type"] == "metrics" and seen.first_seen is None:
                seen.first_seen = time.time()
                seen.first_step = float((event.get("data") or {}).get("time", seen.first_seen))
    seen.done = time.time()
    seen.status = httpx.get(f"{url}/v1/fine_tuning/jobs/{job_id}").json()["status"]


def submit(client: httpx.Client, file_id: str, index: int, epochs: int) -> str:
    response = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "tiny-llama",
            "training_file": file_id,
            "seed": index,
            "hyperparameters": {"n_epochs": epochs, "batch_size": 4},
            "lora": {"r": 8, "alpha": 16},
            "training": {"max_seq_len": 64, "learning_rate": 1e-3},
        },
    )
    response.raise_for_status()
    return str(response.json()["id"])


def run(
    topology: str,
    folder: Path,
    base: Path,
    data: bytes,
    arrivals: list[tuple[float, int]],
    ray_address: str,
    code: Path = ROOT,
) -> dict[str, Seen]:
    """Starts the topology, warms its host with one job, then submits `arrivals`
    ((offset s, epochs)) and follows each job to its end."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "LORAFLEET_DATA_DIR": str(folder / "state"),
        "LORAFLEET_BASE_MODELS": json.dumps({"tiny-llama": str(base)}),
        "LORAFLEET_OBJECT_STORE": str(folder / "objects"),
        "LORAFLEET_SHARED_PATHS": json.dumps([str(folder), str(base.parent)]),
        "LORAFLEET_WARM_HOSTS": "1",
        "LORAFLEET_MAX_CONCURRENT_RUNS": "1",
        "LORAFLEET_HOST_IDLE_SECONDS": "600",
        "LORAFLEET_ZERO3_PARAM_PERSISTENCE_THRESHOLD": "0",
        "LORAFLEET_RAY_NAMESPACE": f"bench-{topology}-{os.getpid()}",
        "RAY_ADDRESS": ray_address,
    }
    postgres = None
    if topology == "api-split":
        sys.path.append(str(ROOT))  # tests.services: the tests' own PostgreSQL
        from tests.services.postgres import start_postgres

        postgres = start_postgres()
        env["LORAFLEET_DATABASE_URL"] = postgres.create_database("bench")
    processes = Processes(folder, env, code)
    try:
        if topology == "api-split":
            url = processes.serve("--no-scheduler")
            processes.start("scheduler")
        else:
            url = processes.serve()
        with httpx.Client(base_url=url, timeout=60) as client:
            upload = client.post(
                "/v1/files", files={"file": ("d.jsonl", data)}, data={"purpose": "fine-tune"}
            )
            upload.raise_for_status()
            file_id = upload.json()["id"]
            warm = Seen(time.time())
            follow(url, submit(client, file_id, 999, 1), warm)  # the host up, its base loaded
            if warm.status != "succeeded":
                raise RuntimeError(f"the warm-up job ended {warm.status}: see {folder}")
            seen: dict[str, Seen] = {}
            threads = []
            start = time.monotonic()
            for index, (offset, epochs) in enumerate(arrivals):
                time.sleep(max(0.0, offset - (time.monotonic() - start)))
                submitted = time.time()
                job_id = submit(client, file_id, index, epochs)
                seen[job_id] = Seen(submitted)
                thread = threading.Thread(target=follow, args=(url, job_id, seen[job_id]))
                thread.start()
                threads.append(thread)
            for thread in threads:
                thread.join()
        return seen
    finally:
        processes.stop()
        end_hosts(env["LORAFLEET_RAY_NAMESPACE"])
        if postgres is not None:
            postgres.stop()


def end_hosts(namespace: str) -> None:
    import ray

    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == namespace:
            ray.kill(ray.get_actor(entry["name"], namespace=namespace))


def figures(
    seen: dict[str, Seen], percentile: Callable[[list[float], int], float]
) -> dict[str, Any]:
    step = [s.first_step - s.submitted for s in seen.values() if s.first_step]
    api = [s.first_seen - s.submitted for s in seen.values() if s.first_seen]
    done = [s.done - s.submitted for s in seen.values() if s.done]
    return {
        "first_step_p50": percentile(step, 50),
        "first_seen_p50": percentile(api, 50),
        "first_seen_p99": percentile(api, 99),
        "done_p50": percentile(done, 50),
        "done_p95": percentile(done, 95),
        "failed": sum(1 for s in seen.values() if s.status != "succeeded"),
    }
