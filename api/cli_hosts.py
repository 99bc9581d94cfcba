"""`lorafleet hosts`: the operator's view of pack hosts on the cluster (a Ray driver, run on
a cluster node or where the data dir's embedded Ray runs), and drain."""

from __future__ import annotations

from typing import Annotated

import typer

hosts = typer.Typer(
    help="Pack hosts on the cluster: list them, drain one or every host on a node.",
    no_args_is_help=True,
)


@hosts.command("list")
def list_hosts() -> None:
    """Each pack host: its id, running jobs, and the Ray nodes it uses (actor and ranks)."""
    from orchestrator.scheduling.drain import connect, hosts_seen
    from orchestrator.settings import Settings

    settings = Settings()
    try:
        connect(settings)
    except LookupError as exc:
        typer.echo(f"lorafleet hosts: {exc}", err=True)
        raise typer.Exit(2) from None
    for host in hosts_seen(settings.ray_namespace):
        nodes = ",".join(sorted(n[:8] for n in host.nodes))
        state = f"draining ({host.draining})" if host.draining else "up"
        typer.echo(f"{host.host_id}\t{host.jobs} job(s)\tnodes {nodes}\t{state}")


@hosts.command("drain")
def drain_hosts(
    target: Annotated[
        str,
        typer.Argument(
            help="A pack host (host-…), or a Ray node: its id (or its first 8 or more "
            "characters) or its IP."
        ),
    ],
) -> None:
    """Drain a pack host, or every pack host on a node: it admits no new job, each of its
    jobs is checkpointed at its next step and requeued (no attempt spent) to continue
    elsewhere from that step, then the host ends. A node is drained through Ray, so no new
    host is placed there either. How lorafleet is upgraded under long-lived hosts
    (deploy/RUNBOOK.md)."""
    from orchestrator.scheduling.drain import drain
    from orchestrator.settings import Settings

    try:
        drained = drain(target, Settings())
    except (LookupError, RuntimeError) as exc:  # names nothing; Ray refused the node's drain
        typer.echo(f"lorafleet hosts drain: {exc}", err=True)
        raise typer.Exit(2) from None
    names = ", ".join(drained) or "none is there now"
    typer.echo(
        f"draining {target}: pack hosts {names}; their jobs are checkpointed at the next step "
        "and requeued (no attempt spent)"
    )
