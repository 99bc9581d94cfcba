"""`lorafleet demo`: the whole product on embedded defaults, driven over HTTP like a user would."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

BASE_NAME = "tiny-llama"
TERMINAL = {"succeeded", "failed", "cancelled"}
console = Console()

WORDS = ["apple", "river", "stone", "cloud", "green", "light", "paper", "music", "tiger", "ocean"]


def _datasets() -> dict[str, list[dict[str, Any]]]:
    shout = [
        {
            "messages": [
                {"role": "user", "content": f"say {a} {b}"},
                {"role": "assistant", "content": f"{a.upper()} {b.upper()}!"},
            ]
        }
        for a in WORDS
        for b in WORDS[:4]
    ]
    add = [{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a in range(8) for b in range(5)]
    return {"shout.jsonl": shout, "add.jsonl": add}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(folder: Path, base: Path, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "LORAFLEET_DATA_DIR": str(folder / "state"),
        "LORAFLEET_BASE_MODELS": json.dumps({BASE_NAME: str(base)}),
        "HF_HUB_OFFLINE": "1",
    }
    log = open(folder / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
    return subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _wait_healthy(client: httpx.Client, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited; see {log}")
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the server did not start within 120 s; see {log}")


def _follow(client: httpx.Client, job_ids: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Live progress bars from the jobs' own metrics events."""
    finished: dict[str, dict[str, Any]] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[status]} {task.fields[loss]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        tasks = {
            jid: progress.add_task(name, total=None, status="queued", loss="")
            for name, jid in job_ids.items()
        }
        while len(finished) < len(job_ids):
            for jid, task in tasks.items():
                if jid in finished:
                    continue
                job = client.get(f"/v1/fine_tuning/jobs/{jid}").json()
                events = client.get(f"/v1/fine_tuning/jobs/{jid}/events", params={"limit": 20})
                metrics = [e for e in events.json()["data"] if e["type"] == "metrics"]
                update: dict[str, Any] = {"status": job["status"]}
                if metrics:
                    data = metrics[0]["data"]
                    update.update(
                        completed=data["step"],
                        total=data["total_steps"],
                        loss=f"loss {data['train_loss']:.3f}",
                    )
                progress.update(task, **update)
                if job["status"] in TERMINAL:
                    finished[jid] = job
            time.sleep(0.5)
    return finished


def _download(client: httpx.Client, job_id: str, target: Path) -> Path:
    response = client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter")
    response.raise_for_status()
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
        tar.extractall(target, filter="data")
    return target


def _output_change(base: Path, adapter: Path, prompt: str) -> tuple[float, str, str]:
    """How far the adapter moves the base's logits on a prompt, and both greedy answers."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits
        plain = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        tuned = PeftModel.from_pretrained(model, adapter)
        after = tuned(**inputs).logits
        adapted = tuned.generate(**inputs, max_new_tokens=8, do_sample=False)
    n = inputs["input_ids"].shape[1]

    def decode(ids: torch.Tensor) -> str:
        return str(tokenizer.decode(ids[0, n:], skip_special_tokens=True))

    return float((after - before).abs().mean()), decode(plain), decode(adapted)


def run_demo(folder: Path, port: int) -> None:
    from workers.tiny_base import build_tiny_base

    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "base-model"
    if not (base / "config.json").exists():
        console.print(f"Building a tiny Llama base model in {base}")
        build_tiny_base(base)
    port = port or _free_port()
    server = _start_server(folder, base, port)
    started = time.monotonic()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            _wait_healthy(client, server, folder / "server.log")
            console.print(f"Server up on http://127.0.0.1:{port} (log: {folder / 'server.log'})")
            job_ids = {}
            for name, rows in _datasets().items():
                body = "\n".join(json.dumps(r) for r in rows).encode()
                upload = client.post(
                    "/v1/files", files={"file": (name, body)}, data={"purpose": "fine-tune"}
                )
                upload.raise_for_status()
                created = client.post(
                    "/v1/fine_tuning/jobs",
                    json={
                        "model": BASE_NAME,
                        "training_file": upload.json()["id"],
                        "suffix": name.removesuffix(".jsonl"),
                        "seed": 7,
                        "method": {
                            "type": "supervised",
                            "supervised": {"hyperparameters": {"n_epochs": 10, "batch_size": 8}},
                        },
                        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
                        "training": {"learning_rate": 1e-2, "max_seq_len": 64},
                    },
                )
                created.raise_for_status()
                job_ids[name.removesuffix(".jsonl")] = created.json()["id"]
            console.print(f"Submitted {len(job_ids)} jobs: {', '.join(job_ids.values())}")
            finished = _follow(client, job_ids)
            prompts = {"shout": "<|user|>\nsay river green<|end|>\n<|assistant|>\n", "add": "3+4="}
            for name, job_id in job_ids.items():
                job = finished[job_id]
                if job["status"] != "succeeded":
                    console.print(f"[red]{name}[/]: {job['status']} {job.get('error')}")
                    continue
                adapter = _download(client, job_id, folder / "adapters" / job_id)
                change, before, after = _output_change(base, adapter, prompts[name])
                console.print(
                    f"[bold]{name}[/]: succeeded as [cyan]{job['fine_tuned_model']}[/]\n"
                    f"  PEFT adapter: {adapter}\n"
                    f"  mean |Δ logit| against the base on {prompts[name]!r}: {change:.4f}\n"
                    f"  greedy answer: base {before!r} → adapted {after!r}"
                )
            console.print(f"Done in {time.monotonic() - started:.0f} s.")
            if any(job["status"] != "succeeded" for job in finished.values()):
                raise SystemExit(1)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
