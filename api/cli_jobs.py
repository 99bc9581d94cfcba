"""`lorafleet files …` and `lorafleet jobs …`: the REST API from a terminal or a script.

Exit codes a script can use: 0 succeeded (or done), 1 failed, 2 bad input, 3 cancelled.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from api.client import ApiError, LorafleetClient
from api.watch import watch_jobs

SUCCEEDED, FAILED, BAD_INPUT, CANCELLED = 0, 1, 2, 3
EXIT_BY_STATUS = {"succeeded": SUCCEEDED, "failed": FAILED, "cancelled": CANCELLED}

files = typer.Typer(help="Training files (JSONL).", no_args_is_help=True)
jobs = typer.Typer(
    help="Fine-tuning jobs.\n\nExample:\n\n  lorafleet jobs create --model tiny-llama "
    "--training-file data.jsonl --epochs 2 --watch",
    no_args_is_help=True,
)
console = Console()
errors = Console(stderr=True)

Url = Annotated[str, typer.Option("--url", envvar="LORAFLEET_URL", help="The lorafleet API.")]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="LORAFLEET_API_KEY", help="Bearer API key."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")]
DEFAULT_URL = "http://127.0.0.1:8000"


@contextmanager
def _api(url: str, api_key: str | None) -> Iterator[LorafleetClient]:
    """The client; API errors become a message and an exit code (2 for the caller's
    mistakes, 1 for the rest)."""
    try:
        with LorafleetClient(url, api_key) as client:
            yield client
    except ApiError as error:
        errors.print(f"[red]error[/] {error}")
        raise typer.Exit(BAD_INPUT if 400 <= error.status_code < 500 else FAILED) from None


def _print(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def _job_line(job: dict[str, Any]) -> str:
    model = job.get("fine_tuned_model") or ""
    return f"{job['id']}  {job['status']:<16} {job['model']}  {model}"


def _show_job(job: dict[str, Any], as_json: bool) -> None:
    _print(job) if as_json else typer.echo(_job_line(job))


@files.command("upload")
def upload(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A JSONL file.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Upload a JSONL training file; prints its id."""
    with _api(url, api_key) as api:
        row = api.upload_file(path)
    _print(row) if as_json else typer.echo(row["id"])


def _file_id(api: LorafleetClient, id_or_path: str) -> str:
    """A local path is uploaded first; anything else is taken as a file id."""
    path = Path(id_or_path)
    return str(api.upload_file(path)["id"]) if path.is_file() else id_or_path


@jobs.command("create")
def create(
    model: Annotated[str, typer.Option(help="Base model name.")],
    training_file: Annotated[str, typer.Option(help="File id, or a local JSONL path.")],
    validation_file: Annotated[str | None, typer.Option(help="File id or path.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the data.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank.")] = None,
    lora_alpha: Annotated[int | None, typer.Option(help="LoRA alpha.")] = None,
    target_modules: Annotated[
        str | None, typer.Option(help='Comma-separated module names, or "all-linear".')
    ] = None,
    suffix: Annotated[str | None, typer.Option(help="Part of the model name.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    dpo_beta: Annotated[
        float | None,
        typer.Option(help="A DPO job (on a preference file) with this beta; 0.1 is OpenAI's."),
    ] = None,
    watch: Annotated[bool, typer.Option(help="Follow it until it ends.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Create a job (uploading local files first); with --watch, follow it and exit with
    its outcome (0 succeeded, 1 failed, 3 cancelled)."""
    with _api(url, api_key) as api:
        hyperparameters = {
            k: v for k, v in {"n_epochs": epochs, "batch_size": batch_size}.items() if v
        }
        method: dict[str, Any]
        if dpo_beta is not None:
            method = {
                "type": "dpo",
                "dpo": {"hyperparameters": {**hyperparameters, "beta": dpo_beta}},
            }
        else:
            method = {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
        body: dict[str, Any] = {
            "model": model,
            "training_file": _file_id(api, training_file),
            "method": method,
        }
        if validation_file:
            body["validation_file"] = _file_id(api, validation_file)
        if lr is not None:
            body["training"] = {"learning_rate": lr}
        lora: dict[str, Any] = {k: v for k, v in {"r": lora_r, "alpha": lora_alpha}.items() if v}
        if target_modules:
            modules = target_modules.split(",")
            lora["target_modules"] = "all-linear" if modules == ["all-linear"] else modules
        if lora:
            body["lora"] = lora
        body.update({k: v for k, v in {"suffix": suffix, "seed": seed}.items() if v is not None})
        job = api.create_job(body)
        if not watch:
            _print(job) if as_json else typer.echo(job["id"])
            return
        _watch(api, job["id"], as_json)


def _watch(api: LorafleetClient, job_id: str, as_json: bool) -> None:
    if as_json:
        for event in api.follow(job_id):
            typer.echo(json.dumps(event))
        job = api.get_job(job_id)
        typer.echo(json.dumps(job))
    else:
        job = watch_jobs(api, {job_id: job_id}, console)[job_id]
        console.print(_job_line(job))
        if job.get("error"):
            console.print(f"[red]{job['error']}[/]")
    raise typer.Exit(EXIT_BY_STATUS.get(job["status"], FAILED))


@jobs.command("watch")
def watch_job(
    job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Live progress (step/total, ETA, loss, valid loss, tokens/s) until the job ends;
    survives a server restart; exits 0 succeeded, 1 failed, 3 cancelled. With --json, one
    event per line, then the job."""
    with _api(url, api_key) as api:
        _watch(api, job_id, as_json)


@jobs.command("list")
def list_jobs(
    limit: int = 20, url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Your newest jobs."""
    with _api(url, api_key) as api:
        found = api.list_jobs(limit)
    if as_json:
        _print(found)
        return
    table = Table("id", "status", "base", "fine-tuned model")
    for job in found:
        table.add_row(job["id"], job["status"], job["model"], job.get("fine_tuned_model") or "")
    console.print(table)


@jobs.command("get")
def get_job(
    job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """One job."""
    with _api(url, api_key) as api:
        job = api.get_job(job_id)
    _show_job(job, as_json)


@jobs.command("cancel")
def cancel_job(
    job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Cancel a queued or running job."""
    with _api(url, api_key) as api:
        job = api.cancel_job(job_id)
    _show_job(job, as_json)


@jobs.command("pause")
def pause_job(
    job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Pause a running job: it is checkpointed at its next step and its slot freed
    (pausing, then paused); no attempt is spent."""
    with _api(url, api_key) as api:
        job = api.pause_job(job_id)
    _show_job(job, as_json)


@jobs.command("resume")
def resume_job(
    job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Resume a paused job: it is queued and continues from the step it paused at."""
    with _api(url, api_key) as api:
        job = api.resume_job(job_id)
    _show_job(job, as_json)


@jobs.command("events")
def job_events(
    job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Every event of a job so far, oldest first."""
    with _api(url, api_key) as api:
        found = api.events(job_id)
    if as_json:
        _print(found)
        return
    for event in found:
        typer.echo(f"{event['created_at']}  {event['level']:<5} {event['message']}")


@jobs.command("download")
def download(
    job_id: str,
    folder: Annotated[Path, typer.Argument(help="Where to put the adapter or merged model.")],
    merged: Annotated[
        bool,
        typer.Option(
            "--merged",
            help="The base with the adapter merged in (safetensors shards, config, "
            "tokenizer: AutoModelForCausalLM.from_pretrained loads it) instead of the adapter.",
        ),
    ] = False,
    scale: Annotated[
        float,
        typer.Option("--scale", help="With --merged: how much of the adapter (1 as trained)."),
    ] = 1.0,
    checkpoint: Annotated[
        str | None,
        typer.Option("--checkpoint", help="With --merged: a checkpoint id instead of the final."),
    ] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Download a succeeded job's PEFT adapter into FOLDER (loads with
    PeftModel.from_pretrained), or with --merged its base with the adapter merged in at
    --scale (merged on the cluster first, then downloaded file by file, each checked
    against its sha256)."""
    with _api(url, api_key) as api:
        if merged:
            target = _download_merged(api, job_id, folder, scale, checkpoint, as_json)
        else:
            target = api.download_adapter(job_id, folder)
    found = sorted(p.name for p in target.iterdir())
    _print({"folder": str(target), "files": found}) if as_json else typer.echo(str(target))


def _download_merged(
    api: LorafleetClient,
    job_id: str,
    folder: Path,
    scale: float,
    checkpoint: str | None,
    quiet: bool,
) -> Path:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=errors,
        disable=quiet,
        transient=False,
    ) as progress:
        waiting = progress.add_task(f"merging at scale {scale:g}", total=None)
        listing = api.wait_merged(
            job_id,
            scale,
            checkpoint,
            on_status=lambda status: progress.update(
                waiting, description=f"merge at scale {scale:g}: {status}"
            ),
        )
        progress.update(waiting, total=1, completed=1)
        total = sum(int(item["size"]) for item in listing["files"])
        task = progress.add_task(f"{len(listing['files'])} files", total=total)
        return api.download_merged(listing, folder, on_bytes=lambda n: progress.advance(task, n))
