"""The `lorafleet` command: `serve` (API + scheduler) and `demo` (trains two real adapters)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

app = typer.Typer(help="lorafleet: LoRA adapter-training jobs on Ray.", no_args_is_help=True)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8000, help="Port to bind."),
) -> None:
    """Run the API and the scheduler in one process (embedded defaults: SQLite, local Ray,
    local object store; see LORAFLEET_* settings)."""
    import uvicorn

    from api.app import create_app

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(create_app(run_scheduler=True), host=host, port=port, log_level="info")


@app.command()
def demo(
    folder: Path = typer.Option(Path(".lorafleet-demo"), help="Where the demo keeps everything."),
    port: int = typer.Option(0, help="Port for the demo server (0 picks a free one)."),
) -> None:
    """Build a tiny base model and two datasets, start a server, train two adapters over
    HTTP with live progress, download them and show how much each changed the model."""
    from api.demo import run_demo

    run_demo(folder, port)


if __name__ == "__main__":
    app()
