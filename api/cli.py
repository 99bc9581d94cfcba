"""The `lorafleet` command: `serve` (API + scheduler), `scheduler`, `keys`, `files`, `jobs`
(the REST API from a terminal), `hosts` (list and drain pack hosts), `demo` (trains two real
adapters) and `ray-stop` (ends a data dir's embedded Ray that no serve will end)."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import typer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.cli_help import unwrap_help
from api.cli_hosts import hosts
from api.cli_jobs import files, jobs
from api.ops import configure_logging, serve_metrics

app = typer.Typer(help="lorafleet: LoRA adapter-training jobs on Ray.", no_args_is_help=True)
keys = typer.Typer(help="API keys: each belongs to one tenant.", no_args_is_help=True)
app.add_typer(keys, name="keys")
app.add_typer(files, name="files")
app.add_typer(jobs, name="jobs")
app.add_typer(hosts, name="hosts")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# On SIGTERM open connections (an event stream a client follows) get this long to end
# before they are closed: with the scheduler's stop and its Ray's end, serve exits in
# seconds (README: within 10 s).
GRACEFUL_SHUTDOWN_S = 3


class StartupErrorInOneLine:
    """`serve`'s app: an error while starting (an unreachable database, a bad setting) is
    printed once, as one line naming it, then serve exits. Starlette would print its
    traceback, whose frames repeat once per router (dozens of lines for one error)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_unless_failed(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "lifespan.startup.complete"
            if message["type"] != "lifespan.startup.failed":  # said below, from the error
                await send(message)

        try:
            await self.app(scope, receive, send_unless_failed)
        except Exception as exc:
            if started:
                raise
            await send({"type": "lifespan.startup.failed", "message": f"not starting: {said(exc)}"})


def said(error: BaseException) -> str:
    """An error as one line: its type and message, without the traceback."""
    return "".join(traceback.format_exception_only(error)).strip()


def _api_keys():  # type: ignore[no-untyped-def]
    from orchestrator.api_keys import ApiKeys
    from orchestrator.db import make_engine, migrate
    from orchestrator.settings import Settings

    engine = make_engine(Settings().database_url)
    migrate(engine)
    return ApiKeys(engine)


def _bootstrap_api_key(api_keys: Any) -> None:
    """The deployment's first key, from its secret, while no key was ever created."""
    from orchestrator.api_keys import bootstrap_key_from
    from orchestrator.settings import Settings

    settings = Settings()
    try:
        key = bootstrap_key_from(settings.bootstrap_api_key, settings.bootstrap_api_key_file)
        row = api_keys.bootstrap(key, settings.bootstrap_tenant) if key else None
    except ValueError as exc:
        typer.echo(f"lorafleet: not starting: {exc}", err=True)
        raise typer.Exit(1) from None
    if row is not None:
        typer.echo(f"stored the bootstrap API key as {row.id} for tenant {row.tenant}", err=True)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8000, help="Port to bind."),
    scheduler: bool = typer.Option(
        True, help="Run the scheduler in this process too (--no-scheduler for API replicas)."
    ),
) -> None:
    """Run the API and the scheduler in one process (embedded defaults: SQLite, local Ray,
    local object store; see LORAFLEET_* settings)."""
    import uvicorn

    from api.app import create_app

    api_keys = _api_keys()
    _bootstrap_api_key(api_keys)
    if host not in LOOPBACK and not api_keys.any_exist():
        raise typer.BadParameter(
            f"refusing to serve on {host} with no API key: anyone could use it. Create one "
            "first with `lorafleet keys create --tenant NAME`, set LORAFLEET_BOOTSTRAP_API_KEY "
            "(or LORAFLEET_BOOTSTRAP_API_KEY_FILE) to a secret, or bind to 127.0.0.1.",
            param_hint="--host",
        )

    configure_logging()
    uvicorn.run(
        StartupErrorInOneLine(create_app(run_scheduler=scheduler)),
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


@app.command("scheduler")
def run_scheduler(
    metrics_port: int = typer.Option(
        0, help="Serve this scheduler's Prometheus /metrics on this port (0: off)."
    ),
    metrics_host: str = typer.Option("127.0.0.1", help="Address for --metrics-port."),
) -> None:
    """Run the scheduler alone (production: next to `serve --no-scheduler` replicas; on
    PostgreSQL several schedulers may run at once). Webhooks are delivered from here too."""
    import signal
    import threading

    from core.objectstore import open_object_store
    from orchestrator.cluster_settings import refuse_what_other_nodes_cannot_see
    from orchestrator.db import make_engine, migrate
    from orchestrator.scheduling.ray_connection import RayConnection
    from orchestrator.scheduling.scheduler import Scheduler
    from orchestrator.settings import Settings
    from orchestrator.store import JobStore
    from orchestrator.store.listener import listen_for_changes
    from orchestrator.webhooks import WebhookDeliverer

    configure_logging()
    try:
        settings = Settings()
        refuse_what_other_nodes_cannot_see(settings)  # on a Ray cluster
        engine = make_engine(settings.database_url)
        migrate(engine)
        objects = open_object_store(settings.object_store_config)
    except Exception as exc:  # the operator's setup: said once, in one line
        typer.echo(f"lorafleet scheduler: not starting: {said(exc)}", err=True)
        raise typer.Exit(1) from None
    store = JobStore(engine)
    # On PostgreSQL a new job from any API replica wakes this scheduler (LISTEN/NOTIFY).
    listener = listen_for_changes(engine, store.changes)
    loop = Scheduler(settings, store, objects, RayConnection(settings))
    deliverer = WebhookDeliverer(settings, engine)
    if metrics_port:
        serve_metrics(store, metrics_host, metrics_port, settings.metrics_token)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    loop.start()
    deliverer.start()
    # Waits in short slices: the kernel may hand SIGTERM to one of Ray's threads, and then
    # only a main thread that wakes by itself runs the Python handler (an endless wait hung).
    while not stopped.wait(timeout=0.2):
        pass
    deliverer.stop()
    loop.stop()
    if listener is not None:
        listener.stop()


@keys.command("create")
def create_key(
    tenant: str = typer.Option(..., help="The tenant the key acts for."),
    tinker: bool = typer.Option(
        False, "--tinker", hidden=True, help="Kept for old scripts: every key is tml- now."
    ),
) -> None:
    """Create an API key (prefix tml-: the `tinker` SDK accepts it, and every API here);
    the key itself is printed once, as the last line."""
    row, key = _api_keys().create(tenant)
    typer.echo(f"created {row.id} for tenant {row.tenant}; keep the key, it is not stored:")
    typer.echo(key)


@keys.command("revoke")
def revoke_key(key: str = typer.Argument(..., help="The key, or its id (key-…).")) -> None:
    """Revoke an API key at once."""
    row = _api_keys().revoke(key)
    typer.echo(f"revoked {row.id} ({row.key_prefix}…, tenant {row.tenant})")


@keys.command("list")
def list_keys() -> None:
    """List API keys (ids, tenants and the first characters of each key)."""
    for row in _api_keys().list():
        state = "revoked" if row.revoked_at else "active"
        typer.echo(f"{row.id}\t{row.tenant}\t{row.key_prefix}…\t{state}")


@app.command("ray-stop")
def ray_stop(
    data_dir: Path | None = typer.Option(
        None, help="The data dir whose Ray to end (default: LORAFLEET_DATA_DIR, else .lorafleet)."
    ),
) -> None:
    """End the embedded Ray recorded in a data dir (DATA_DIR/ray-head.json), with its pack
    hosts: for a `serve` that was killed and will not start again there. Only that Ray, by
    its recorded pid; never `ray stop`, which would end every Ray on the machine."""
    from orchestrator.scheduling import embedded_ray
    from orchestrator.settings import Settings

    folder = data_dir if data_dir is not None else Settings().data_dir
    recorded = embedded_ray.read_record(folder)
    if recorded is None:
        typer.echo(f"no Ray recorded in {folder}; nothing to end")
        return
    processes = recorded.processes()
    embedded_ray.stop(folder)
    left = [pid for pid in processes if embedded_ray.process_alive(pid)]
    if left:
        typer.echo(f"Ray processes of {folder} still running: {left}", err=True)
        raise typer.Exit(1)
    state = f"{len(processes)} processes ended" if processes else "it had already ended"
    typer.echo(f"ended the Ray of {folder} (pid {recorded.pid}, {recorded.address}): {state}")


@app.command()
def demo(
    folder: Path = typer.Option(Path(".lorafleet-demo"), help="Where the demo keeps everything."),
    port: int = typer.Option(0, help="Port for the demo server (0 picks a free one)."),
) -> None:
    """Build a tiny base model and two datasets, start a server, train two adapters over
    HTTP with live progress, download them and show how much each changed the model."""
    from api.demo import run_demo

    run_demo(folder, port)


# Last, once every command is registered: --help reads as paragraphs (api/cli_help.py).
unwrap_help(app)

if __name__ == "__main__":
    app()
