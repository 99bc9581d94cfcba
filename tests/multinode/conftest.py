"""What the multinode tests share: a serve's environment on a test's own Ray cluster, and
the steps a job's metrics events name."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tests.e2e.conftest import LorafleetServer


def cluster_env(
    address: str, folder: Path, tiny_base: Path, namespace: str, **settings: str
) -> dict[str, str]:
    """A serve's environment on the cluster at `address`: none of the session's `LORAFLEET_*`
    or `RAY_*` settings, state in `folder`, the tiny Llama as "tiny-llama", a 0.2 s tick;
    every node is on this machine, so its folders are every node's. `settings` add or
    override `LORAFLEET_*` settings by name."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("LORAFLEET_", "RAY_"))}
    lorafleet = {
        "data_dir": str(folder / "state"),
        "base_models": json.dumps({"tiny-llama": str(tiny_base)}),
        "shared_paths": json.dumps([str(folder), str(tiny_base.parent)]),
        "ray_namespace": namespace,
        "scheduler_poll_seconds": "0.2",
        **settings,
    }
    return {
        **inherited,
        "RAY_ADDRESS": address,
        "RAY_AUTH_MODE": "disabled",
        **{f"LORAFLEET_{k.upper()}": v for k, v in lorafleet.items()},
    }


def metrics_steps(server: LorafleetServer, client: Any, job_id: str) -> list[int]:
    return [e["data"]["step"] for e in server.all_events(client, job_id) if e["type"] == "metrics"]
