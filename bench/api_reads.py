"""The API's read path against a bare FastAPI JSON route, side by side on one uvicorn.

One server process (the lorafleet app on SQLite with a few hundred jobs and an API key,
plus `/bench/bare`, a route returning a small dict) and one load-generator process (a light
asyncio HTTP/1.1 keep-alive client, so the client spends little of the CPU the server
needs). Rounds alternate bare, GET job, list, so drift in machine load hits all three alike.

    .venv/bin/python bench/api_reads.py [--clients 64] [--seconds 4] [--rounds 3] [--jobs 300]

Last line: `api get_ratio=<x> list_ratio=<y>` (requests/s of each over the bare route's,
medians of the rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BARE = "/bench/bare"


def write_stub_base(folder: Path) -> Path:
    """A model folder the catalog accepts (config.json + a safetensors header); nothing here
    trains, so no real weights are needed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    header = json.dumps(
        {
            "model.layers.0.self_attn.q_proj.weight": {
                "dtype": "F32",
                "shape": [1, 1],
                "data_offsets": [0, 4],
            }
        }
    ).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    return folder


def serve(port: int, data_dir: Path, key_file: Path) -> None:
    """The server process: the app as `serve --no-scheduler` runs it, plus the bare route."""
    import uvicorn

    from api.app import create_app
    from orchestrator.api_keys import ApiKeys
    from orchestrator.db import make_engine, migrate
    from orchestrator.settings import Settings

    settings = Settings(
        data_dir=data_dir,
        base_models={"stub": str(write_stub_base(data_dir / "stub"))},
        max_active_jobs_per_tenant=1_000_000,  # nothing trains here: every job stays queued
        rate_limit_per_second=0,  # one key sends everything: the bench measures the routes
    )
    engine = make_engine(settings.database_url)
    migrate(engine)
    _, key = ApiKeys(engine).create("bench")
    engine.dispose()
    key_file.write_text(key)
    app = create_app(settings)

    @app.get(BARE)
    def bare() -> dict[str, object]:
        return {"object": "model", "id": "bare", "created": 0, "owned_by": "bench"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


async def _client(host: str, port: int, request: bytes, stop_at: float, done: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < stop_at:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            if status != 200:
                raise RuntimeError(f"HTTP {status} from {request.splitlines()[0]!r}")
            done[0] += 1
    finally:
        writer.close()


async def _load(port: int, path: str, key: str, clients: int, seconds: float) -> float:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n"
    ).encode()
    done = [0]
    start = time.monotonic()
    stop_at = start + seconds
    await asyncio.gather(
        *(_client("127.0.0.1", port, request, stop_at, done) for _ in range(clients))
    )
    return done[0] / (time.monotonic() - start)


def load(argv: list[str]) -> None:
    """The load-generator process: prints requests/s for one path."""
    port, path, key, clients, seconds = argv
    rate = asyncio.run(_load(int(port), path, key, int(clients), float(seconds)))
    print(f"{rate:.1f}")


def measure(port: int, path: str, key: str, clients: int, seconds: float) -> float:
    here = str(Path(__file__).resolve())
    args = [str(port), path, key, str(clients), str(seconds)]
    out = subprocess.run(
        [sys.executable, here, "--load", *args], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=300)
    args = parser.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = Path(tempfile.mkdtemp(prefix="lorafleet-bench-api-"))
    key_file = folder / "key"
    here = str(Path(__file__).resolve())
    server = subprocess.Popen(
        [sys.executable, here, "--serve", str(port), str(folder / "state"), str(key_file)],
        env={**os.environ, "PYTHONPATH": str(Path(here).parents[1])},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        key = key_file.read_text()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client:
            data = b'{"prompt": "1+1=", "completion": "2"}\n'
            file_id = client.post(
                "/v1/files", files={"file": ("d.jsonl", data)}, data={"purpose": "fine-tune"}
            ).json()["id"]
            for i in range(args.jobs):
                created = client.post(
                    "/v1/fine_tuning/jobs",
                    json={"model": "stub", "training_file": file_id, "metadata": {"n": str(i)}},
                )
                created.raise_for_status()
            job_id = created.json()["id"]
        paths = {
            "bare": BARE,
            "get": f"/v1/fine_tuning/jobs/{job_id}",
            "list": "/v1/fine_tuning/jobs?limit=20",
        }
        measure(port, BARE, key, args.clients, 1.0)  # warm-up
        rates: dict[str, list[float]] = {name: [] for name in paths}
        for round_ in range(args.rounds):
            for name, path in paths.items():
                rates[name].append(measure(port, path, key, args.clients, args.seconds))
            print(
                f"round {round_ + 1}: "
                + "  ".join(f"{n}={r[-1]:.0f} req/s" for n, r in rates.items()),
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    get_ratio = statistics.median(g / b for g, b in zip(rates["get"], rates["bare"], strict=True))
    list_ratio = statistics.median(g / b for g, b in zip(rates["list"], rates["bare"], strict=True))
    print(f"clients={args.clients} jobs={args.jobs} seconds={args.seconds} rounds={args.rounds}")
    print(f"api get_ratio={get_ratio:.2f} list_ratio={list_ratio:.2f}")


if __name__ == "__main__":
    # This file is named api.py: its folder must not shadow the `api` package.
    HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.path.insert(0, str(HERE.parent))
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--load":
        load(sys.argv[2:])
    else:
        main()
