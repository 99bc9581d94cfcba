"""Live progress bars for jobs, drawn from their event streams (`jobs watch`, the demo)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from api.client import LorafleetClient

OnEvent = Callable[[str, dict[str, Any]], None]
# How often a bar asks for its job's `estimated_finish` (a GET) while steps come in: the
# server's estimate moves slowly, and many watchers should not poll a server per step.
FINISH_REFRESH_S = 5.0


def progress_fields(event: dict[str, Any]) -> dict[str, Any]:
    """What one event changes on a job's bar: total steps once training starts, then step,
    losses and speed from each metrics event."""
    data = event.get("data") or {}
    update: dict[str, Any] = {}
    if "total_steps" in data:
        update["total"] = data["total_steps"]
        update["steps"] = f"{data.get('step', 0)}/{data['total_steps']} steps"
    if event.get("type") == "metrics":
        update["completed"] = data["step"]
        update["loss"] = f"loss {data['train_loss']:.3f}" if "train_loss" in data else ""
        if data.get("valid_loss") is not None:
            update["valid"] = f"valid {data['valid_loss']:.3f}"
        if data.get("tokens_per_second"):
            update["speed"] = f"{data['tokens_per_second']:.0f} tok/s"
    if "status" in data:
        update["status"] = data["status"]
    return update


def finish_text(estimated_finish: int | None) -> str:
    """The job's `estimated_finish` as a local time of day (with the date if not today)."""
    if estimated_finish is None:
        return ""
    at = datetime.fromtimestamp(estimated_finish)
    shown = at.strftime("%H:%M:%S" if at.date() == datetime.now().date() else "%Y-%m-%d %H:%M")
    return f"ends ~{shown}"


def watch_jobs(
    client: LorafleetClient,
    job_ids: dict[str, str],
    console: Console | None = None,
    on_event: OnEvent | None = None,
) -> dict[str, dict[str, Any]]:
    """Follows each job (one stream per job, in threads) with a progress bar until all end;
    returns each job's final state by id. Bars read "0/? steps" until the job's total is
    known from its "Training started" event; while it trains, a bar shows the server's
    `estimated_finish` (asked every FINISH_REFRESH_S as steps come in)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[steps]}"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]} {task.fields[loss]} {task.fields[valid]}"),
        TextColumn("{task.fields[speed]}"),
        TextColumn("{task.fields[finish]}"),
    )
    errors: list[BaseException] = []
    with Progress(*columns, console=console or Console()) as progress:

        def follow(name: str, job_id: str, task: TaskID) -> None:
            asked = 0.0
            try:
                for event in client.follow(job_id):
                    if on_event:
                        on_event(job_id, event)
                    update = progress_fields(event)
                    if (
                        event.get("type") == "metrics"
                        and time.monotonic() - asked > FINISH_REFRESH_S
                    ):
                        asked = time.monotonic()
                        update["finish"] = finish_text(client.get_job(job_id)["estimated_finish"])
                    elif update.get("status") not in (None, "running"):
                        update["finish"] = ""
                    progress.update(task, **update)
            except BaseException as error:  # reported by the caller's thread
                errors.append(error)

        threads = []
        for name, job_id in job_ids.items():
            task = progress.add_task(
                name,
                total=None,
                steps="0/? steps",
                status="",
                loss="",
                valid="",
                speed="",
                finish="",
            )
            thread = threading.Thread(target=follow, args=(name, job_id, task), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return {job_id: client.get_job(job_id) for job_id in job_ids.values()}
