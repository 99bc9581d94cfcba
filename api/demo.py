"""`lorafleet demo`: the whole product on embedded defaults, driven over HTTP like a user would."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from api.client import LorafleetClient
from api.server_process import ServerExited, ServerProcess
from api.watch import watch_jobs
from core.sample_data import shout_chats
from orchestrator.scheduling import embedded_ray

BASE_NAME = "tiny-llama"
JOIN_AFTER_S = 3.0  # the second job arrives this long after the first one's first step
console = Console()

FACTS = {"the sky": "blue", "grass": "green", "snow": "white", "coal": "black"}
PROMPTS = {"shout": "<|user|>\nsay river green<|end|>\n<|assistant|>\n", "facts": "grass is "}
WORDS = ["apple", "river", "stone", "cloud", "green", "light", "paper", "music", "tiger", "ocean"]
# The merged model's answer at each of these scales: W' = W + scale · (alpha / r) · B·A.
SCALES = (0.0, 0.5, 1.0)
MAX_NEW_TOKENS = 16
END_OF_TURN = "<|end|>"  # "RIVER GREEN!" is 12 tokens of the tiny base's byte-level BPE


def _datasets() -> dict[str, list[dict[str, Any]]]:
    # A tiny random base learns phrases by heart, not a rule: each adapter is asked one of
    # its own training prompts ("say river green" is a pair of the first five words).
    shout = shout_chats(WORDS, partners=5, end="!")
    facts = [{"prompt": f"{a} is ", "completion": f"{b}."} for a, b in FACTS.items()]
    return {"shout.jsonl": shout, "facts.jsonl": facts * 8}


@dataclass
class Answers:
    """What the demo shows of one adapter: the greedy answers to its prompt."""

    change: float  # mean |Δ logit| of base + adapter (peft) against the base
    base: str
    adapted: str  # base + adapter through peft, unmerged
    merged: dict[float, str]  # scale -> the answer of the merged weights the API gave


def _download_merged(api: LorafleetClient, job_id: str, scale: float, target: Path) -> Path:
    """The job's adapter merged into its base at `scale`, as a user gets it: asked of the
    API (202 while the merge runs as a Ray task), then each listed file downloaded and
    checked against its sha256."""
    deadline = time.monotonic() + 300
    while True:
        response = api.http.get(f"/v1/fine_tuning/jobs/{job_id}/merged", params={"scale": scale})
        if response.status_code == 200:
            break
        if response.status_code != 202:
            raise SystemExit(f"merged weights of {job_id} at {scale:g}: {response.text}")
        if time.monotonic() > deadline:
            raise SystemExit(f"merged weights of {job_id} at {scale:g} not ready in 300 s")
        time.sleep(0.5)
    target.mkdir(parents=True, exist_ok=True)
    for item in response.json()["files"]:
        body = api.http.get(item["url"], follow_redirects=True)
        body.raise_for_status()
        if hashlib.sha256(body.content).hexdigest() != item["sha256"]:
            raise SystemExit(f"{item['name']} of {job_id}'s merged weights: sha256 differs")
        (target / item["name"]).write_bytes(body.content)
    return target


def _answers(base: Path, adapter: Path, merged: dict[float, Path], prompt: str) -> Answers:
    """The base's, the adapted model's (peft) and each merged folder's greedy answers."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    # Training put BOS first (workers/data/tokenization.py); the question does too.
    inputs = tokenizer(tokenizer.bos_token + prompt, return_tensors="pt", add_special_tokens=False)
    n = inputs["input_ids"].shape[1]

    def answer(lm: Any) -> str:
        out = lm.generate(
            **inputs,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        text = str(tokenizer.decode(out[0, n:], skip_special_tokens=True))
        # The chat's end marker is plain text to the tiny tokenizer: the answer ends there.
        return text.split(END_OF_TURN)[0]

    with torch.no_grad():
        before = model(**inputs).logits
        plain = answer(model)
        with warnings.catch_warnings():
            # peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` while
            # wrapping the model; only that FutureWarning is muted, only here.
            warnings.filterwarnings(
                "ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning
            )
            tuned = PeftModel.from_pretrained(model, adapter)
        after = tuned(**inputs).logits
        adapted = answer(tuned)
        by_scale = {
            scale: answer(AutoModelForCausalLM.from_pretrained(folder))
            for scale, folder in merged.items()
        }
    return Answers(float((after - before).abs().mean()), plain, adapted, by_scale)


def _quiet_noise() -> None:
    """DeepSpeed warns when it guesses the CPU accelerator, which a newcomer reads as an
    error: name it explicitly on a machine without CUDA (the server's Ray workers inherit
    this environment)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # transformers' per-file progress bars (writing and loading a 1 MB model) are noise here.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def _job_body(name: str, file_id: str, epochs: int) -> dict[str, Any]:
    return {
        "model": BASE_NAME,
        "training_file": file_id,
        "suffix": name,
        "seed": 7,
        "method": {
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": epochs, "batch_size": 8}},
        },
        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
        "training": {"learning_rate": 1e-2, "max_seq_len": 64},
    }


def _first_step(api: LorafleetClient, job_id: str, timeout: float = 600) -> dict[str, Any]:
    """The data of the job's first metrics event (it is training), polled over the API."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [e["data"] for e in api.events(job_id) if e["type"] == "metrics"]
        if steps:
            return steps[0]
        if api.get_job(job_id)["status"] in ("succeeded", "failed", "cancelled"):
            raise SystemExit(f"{job_id} ended before its first step: {api.get_job(job_id)}")
        time.sleep(0.3)
    raise SystemExit(f"{job_id} made no training step in {timeout:.0f} s")


def _print_join(api: LorafleetClient, job_ids: dict[str, str], submitted: float) -> None:
    """What the API shows about the join: each job's pack host (its "started" event), the
    pack size the second job joined at, and the first job's pack size over its steps."""
    events = {name: api.events(job_id) for name, job_id in job_ids.items()}
    hosts = {
        name: next((e["data"]["run_id"] for e in found if "run_id" in (e["data"] or {})), "?")
        for name, found in events.items()
    }
    joined: dict[str, Any] = next(
        (
            e["data"]
            for e in events["facts"]
            if "pack_size" in (e["data"] or {}) and e["type"] != "metrics"
        ),
        {},
    )
    steps = [e["data"] for e in events["facts"] if e["type"] == "metrics"]
    first_step = f"{steps[0]['time'] - submitted:.1f} s" if steps and "time" in steps[0] else "?"
    sizes = [e["data"]["pack_size"] for e in events["shout"] if e["type"] == "metrics"]
    changes = [str(s) for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]]
    same = "the running" if hosts["facts"] == hosts["shout"] else "another"
    console.print(
        f"facts joined {same} pack host {hosts['facts']} (shout's: {hosts['shout']}) at host "
        f"step {joined.get('host_step', '?')}, in a pack of {joined.get('pack_size', '?')}; "
        f"submit → first step {first_step}\n"
        f"shout's pack size over its steps: {' → '.join(changes)}"
    )


def _base_model(folder: Path) -> Path:
    """The tiny base, built once: into a folder of its own, renamed into place when whole,
    so an interrupted build never leaves a base that looks ready and is not."""
    base = folder / "base-model"
    if not base.exists():
        console.print(f"Building a tiny Llama base model in {base}")
        partial = folder / "base-model.partial"
        shutil.rmtree(partial, ignore_errors=True)  # an earlier build cut short
        # In a process of its own: the API side never imports the training stack.
        subprocess.run([sys.executable, "-m", "workers.tiny_base", str(partial)], check=True)
        partial.rename(base)
    return base


def _fresh_state(state: Path) -> None:
    """Each demo starts from an empty server state: an earlier run cut short would otherwise
    leave its jobs to train beside this run's. Its Ray, if one is still recorded there (a
    demo killed outright), is ended first."""
    if state.exists():
        embedded_ray.stop(state)
    shutil.rmtree(state, ignore_errors=True)


def _stop(server: ServerProcess, state: Path) -> None:
    """Stops the server (a clean stop ends its Ray) and, should the server not have ended
    it (killed after the stop's timeout, or told by a second Ctrl-C to quit at once), the
    Ray recorded in its state. A Ctrl-C while stopping does not cut the stop short."""
    while True:
        try:
            server.stop()
            if embedded_ray.read_record(state) is not None:
                embedded_ray.stop(state)
            return
        except KeyboardInterrupt:
            console.print("Still stopping the server and its Ray; a moment, please.")


def run_demo(folder: Path, port: int) -> None:
    try:
        _run_demo(folder, port)
    except httpx.TransportError as error:  # the server ended under the demo (its log says why)
        raise SystemExit(f"lost the demo's server ({error}); see {folder / 'server.log'}") from None
    except KeyboardInterrupt:
        # Ctrl-C: the server and its Ray were stopped on the way out (_stop); no traceback.
        console.print("Interrupted; the demo's server and its Ray are stopped.")
        raise SystemExit(130) from None


def _run_demo(folder: Path, port: int) -> None:
    _quiet_noise()
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    base = _base_model(folder)
    state = folder / "state"
    _fresh_state(state)
    server = ServerProcess.with_settings(
        folder / "server.log",
        data_dir=str(state),
        base_models=json.dumps({BASE_NAME: str(base)}),
    )
    server.env["HF_HUB_OFFLINE"] = "1"
    server.port = port
    started = time.monotonic()
    try:
        server.start(same_port=bool(port))
    except (ServerExited, TimeoutError) as error:
        _stop(server, state)
        raise SystemExit(f"the server did not start; see {server.log}") from error
    except BaseException:
        _stop(server, state)
        raise
    try:
        with server.api() as api:
            console.print(
                f"Server up on {server.url} (dashboard: {server.url}/, log: {server.log})"
            )
            files = {
                name.removesuffix(".jsonl"): api.upload_records(name, rows)["id"]
                for name, rows in _datasets().items()
            }
            # The first job starts a pack host (cold: worker group, model load, DeepSpeed);
            # the second arrives while it trains and joins that warm host at a step boundary.
            job_ids = {"shout": api.create_job(_job_body("shout", files["shout"], 30))["id"]}
            console.print(f"Submitted shout ({job_ids['shout']}); a pack host starts for it")
            step = _first_step(api, job_ids["shout"])
            console.print(
                f"shout is training (step {step['step']}/{step['total_steps']}); "
                f"submitting facts in {JOIN_AFTER_S:g} s, while it trains"
            )
            time.sleep(JOIN_AFTER_S)
            submitted = time.time()
            # 25 epochs of 32 rows: 100 steps, enough for the tiny base to say "green." (10
            # gave "gre.").
            job_ids["facts"] = api.create_job(_job_body("facts", files["facts"], 25))["id"]
            finished = watch_jobs(api, job_ids, console)
            _print_join(api, job_ids, submitted)
            for name, job_id in job_ids.items():
                job = finished[job_id]
                if job["status"] != "succeeded":
                    console.print(f"[red]{name}[/]: {job['status']} {job.get('error')}")
                    continue
                adapter = api.download_adapter(job_id, folder / "adapters" / job_id)
                merged = {
                    scale: _download_merged(
                        api, job_id, scale, folder / "merged" / job_id / f"scale-{scale:g}"
                    )
                    for scale in SCALES
                }
                shown = _answers(base, adapter, merged, PROMPTS[name])
                answers = "  ".join(f"{s:g}: {a!r}" for s, a in shown.merged.items())
                console.print(
                    f"[bold]{name}[/]: succeeded as [cyan]{job['fine_tuned_model']}[/]\n"
                    f"  PEFT adapter: {adapter}\n"
                    f"  mean |Δ logit| against the base on {PROMPTS[name]!r}: "
                    f"{shown.change:.4f}\n"
                    f"  greedy answer: base {shown.base!r} → adapted {shown.adapted!r}\n"
                    f"  merged weights (GET …/merged?scale=) answer at scale {answers}"
                )
            console.print(f"Done in {time.monotonic() - started:.0f} s.")
            if any(job["status"] != "succeeded" for job in finished.values()):
                raise SystemExit(1)
    finally:
        if server.process is not None and server.process.poll() is None:
            console.print("Stopping the server and its Ray")
        _stop(server, state)
