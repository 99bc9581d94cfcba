"""A cluster is settings only: with a Ray cluster address, every path the settings name must
mean the same thing on every node, or `serve` and `scheduler` refuse to start, saying what
to set. Without an address (the embedded default) nothing here applies.

What each node does with a setting decides the rule:
- the object store is read and written by the API, the scheduler and every rank: `s3://`, or
  a folder every node mounts at the same path (`shared_paths`);
- a local base model is read by every rank: the same, or an `s3://` URI;
- `model_cache_dir` (each node's own download cache) and `ray_storage_path` (Ray Train's run
  folder, written on the control node) are used as-is on another node: absolute, never
  relative to whichever working directory a process happens to have.

A cluster whose GCS listens on this machine's own address (a single-machine cluster, as in
tests) has all its nodes here: its absolute local folders are seen by all of them.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from orchestrator.settings import Settings

# Ray's own words for "start a cluster here" (not a cluster to join).
_LOCAL_WORDS = {"local"}


class ClusterSettingsError(ValueError):
    """A setting names something other Ray nodes cannot see; the message says what to set."""


def cluster_address(settings: Settings) -> str | None:
    """The Ray cluster the settings join, if any (None: the data dir's own embedded Ray)."""
    return settings.ray_address or os.environ.get("RAY_ADDRESS") or None


def on_this_machine(address: str) -> bool:
    """Whether every node of the cluster at `address` is surely on this machine: its GCS
    listens on loopback, which no other machine can join. A GCS on this machine's own
    network address proves nothing (the scheduler beside a real cluster's head has one)."""
    if address in _LOCAL_WORDS:
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def problems(settings: Settings, address: str) -> list[str]:
    """What in `settings` other nodes of the cluster at `address` cannot see, each with the
    setting to change."""
    single_machine = on_this_machine(address)
    found: list[str] = []
    shared: list[Path] = []
    for entry in settings.shared_paths:
        if Path(entry).is_absolute():
            shared.append(Path(entry))
        else:
            found.append(f"LORAFLEET_SHARED_PATHS: {entry!r} is not an absolute folder")

    def unseen(path: Path) -> bool:
        return not single_machine and not any(path.is_relative_to(s) for s in shared)

    store = settings.object_store
    if not store.startswith("s3://"):
        if not Path(store).is_absolute():
            found.append(
                f"LORAFLEET_OBJECT_STORE is the relative folder {store!r}: each node would "
                "resolve it in its own working directory. Set LORAFLEET_OBJECT_STORE=s3://"
                "bucket/prefix (with LORAFLEET_S3_ENDPOINT_URL and the S3 keys)"
            )
        elif unseen(Path(store)):
            found.append(
                f"LORAFLEET_OBJECT_STORE is {store!r}, a folder of this machine that other "
                "nodes cannot see. Set LORAFLEET_OBJECT_STORE=s3://bucket/prefix (with "
                "LORAFLEET_S3_ENDPOINT_URL and the S3 keys), or list its shared mount in "
                "LORAFLEET_SHARED_PATHS"
            )
    folders = {
        "LORAFLEET_MODEL_CACHE_DIR": settings.model_cache_dir,
        "LORAFLEET_RAY_STORAGE_PATH": settings.ray_storage_path,
    }
    for name, folder in folders.items():
        if folder is not None and not Path(folder).is_absolute():
            found.append(
                f"{name} is the relative folder '{folder}': other nodes would use it from "
                f"their own working directory. Set {name} (or LORAFLEET_DATA_DIR) to an "
                "absolute folder"
            )
    for model, location in sorted(settings.base_models.items()):
        if location.startswith("s3://"):
            continue
        if not Path(location).is_absolute():
            found.append(
                f"LORAFLEET_BASE_MODELS: {model} is at the relative folder {location!r}. "
                "Put it in the object store (s3://…) or on a shared folder, by absolute path"
            )
        elif unseen(Path(location)):
            found.append(
                f"LORAFLEET_BASE_MODELS: {model} is at {location!r}, a folder of this machine "
                "that other nodes cannot see. Put it in the object store (s3://…), or list its "
                "shared mount (mounted at the same path on every node) in "
                "LORAFLEET_SHARED_PATHS"
            )
    return found


def refuse_what_other_nodes_cannot_see(settings: Settings) -> None:
    """Raises `ClusterSettingsError` naming every problem, when a cluster address is set."""
    address = cluster_address(settings)
    if address is None:
        return
    found = problems(settings, address)
    if found:
        raise ClusterSettingsError(f"on the Ray cluster at {address}: " + "; ".join(found))
