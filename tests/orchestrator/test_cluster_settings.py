"""A cluster is settings only: with a Ray cluster address, `serve` and `scheduler` refuse at
start anything other nodes cannot see, saying what to set; the embedded default (no address)
and a cluster of this machine only (GCS on loopback) keep local folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from api.app import ServeRefused, create_app
from orchestrator.cluster_settings import (
    ClusterSettingsError,
    on_this_machine,
    problems,
    refuse_what_other_nodes_cannot_see,
)
from orchestrator.settings import Settings

CLUSTER = "10.0.0.5:6379"  # another machine's GCS
S3 = {"object_store": "s3://bucket/fleet", "s3_endpoint_url": "http://s3.internal:9000"}


@pytest.fixture(autouse=True)
def no_ray_address_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name in [n for n in os.environ if n.startswith("LORAFLEET_")]:
        monkeypatch.delenv(name)


def test_the_embedded_default_keeps_its_local_folders() -> None:
    settings = Settings(data_dir=Path(".lorafleet"))  # relative, as out of the box
    refuse_what_other_nodes_cannot_see(settings)


def test_the_default_local_object_store_is_refused_naming_what_to_set() -> None:
    with pytest.raises(ClusterSettingsError) as refused:
        refuse_what_other_nodes_cannot_see(Settings(ray_address=CLUSTER))
    message = str(refused.value)
    assert CLUSTER in message
    assert "LORAFLEET_OBJECT_STORE=s3://" in message
    # The data dir's defaults are relative: every folder derived from it is named.
    for name in ("LORAFLEET_MODEL_CACHE_DIR", "LORAFLEET_RAY_STORAGE_PATH"):
        assert name in message


def test_ray_address_from_the_environment_counts_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", CLUSTER)
    with pytest.raises(ClusterSettingsError, match="LORAFLEET_OBJECT_STORE"):
        refuse_what_other_nodes_cannot_see(Settings())


def test_an_absolute_local_store_is_refused_unless_it_is_a_shared_mount(tmp_path: Path) -> None:
    store = tmp_path / "nfs" / "objects"
    settings = Settings(ray_address=CLUSTER, data_dir=tmp_path, object_store=str(store))
    (found,) = problems(settings, CLUSTER)
    assert "other nodes cannot see" in found and "LORAFLEET_SHARED_PATHS" in found
    shared = Settings(
        ray_address=CLUSTER,
        data_dir=tmp_path,
        object_store=str(store),
        shared_paths=[str(tmp_path / "nfs")],
    )
    assert problems(shared, CLUSTER) == []


def test_base_models_must_be_in_s3_or_under_a_shared_path(tmp_path: Path) -> None:
    catalog = {"s3-model": "s3://models/a", "nfs-model": "/mnt/models/b", "disk": "/opt/c"}
    settings = Settings(
        ray_address=CLUSTER,
        data_dir=tmp_path,
        base_models=catalog,
        shared_paths=["/mnt/models"],
        **S3,
    )
    (found,) = problems(settings, CLUSTER)
    assert "disk" in found and "/opt/c" in found and "s3://" in found
    relative = Settings(
        ray_address=CLUSTER, data_dir=tmp_path, base_models={"rel": "models/x"}, **S3
    )
    (found,) = problems(relative, CLUSTER)
    assert "rel" in found and "relative" in found


def test_relative_folders_are_refused_even_on_a_single_machine_cluster() -> None:
    settings = Settings(ray_address="127.0.0.1:6379", data_dir=Path("state"), **S3)
    found = problems(settings, "127.0.0.1:6379")
    assert len(found) == 2, found  # model cache and Ray Train's run folder
    assert all("relative" in f for f in found)


def test_a_cluster_on_loopback_keeps_absolute_local_folders(tmp_path: Path) -> None:
    settings = Settings(
        ray_address="127.0.0.1:6379", data_dir=tmp_path, base_models={"m": str(tmp_path / "m")}
    )
    assert problems(settings, "127.0.0.1:6379") == []


@pytest.mark.parametrize(
    ("address", "here"),
    [
        ("127.0.0.1:6379", True),
        ("localhost:6379", True),
        ("[::1]:6379", True),
        ("local", True),
        ("10.0.0.5:6379", False),
        ("ray-head:6379", False),
        ("auto", False),  # whatever cluster this machine is part of
    ],
)
def test_only_a_loopback_gcs_is_surely_this_machine_alone(address: str, here: bool) -> None:
    assert on_this_machine(address) is here


def test_a_relative_shared_path_is_refused(tmp_path: Path) -> None:
    settings = Settings(ray_address=CLUSTER, data_dir=tmp_path, shared_paths=["nfs"], **S3)
    (found,) = problems(settings, CLUSTER)
    assert "LORAFLEET_SHARED_PATHS" in found


def test_an_s3_cluster_setup_with_absolute_folders_passes(tmp_path: Path) -> None:
    settings = Settings(ray_address=CLUSTER, data_dir=tmp_path, **S3)
    refuse_what_other_nodes_cannot_see(settings)


def test_serve_refuses_before_it_starts(tmp_path: Path) -> None:
    with pytest.raises(ServeRefused, match="LORAFLEET_OBJECT_STORE=s3://"):
        create_app(Settings(ray_address=CLUSTER, data_dir=tmp_path))


@pytest.mark.parametrize("command", [["serve", "--no-scheduler"], ["scheduler"]])
def test_both_commands_refuse_in_one_line_saying_what_to_set(
    tmp_path: Path, command: list[str]
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAFLEET_", "RAY_"))}
    env.update(
        LORAFLEET_DATA_DIR=str(tmp_path),
        LORAFLEET_RAY_ADDRESS=CLUSTER,
        LORAFLEET_BASE_MODELS=json.dumps({"tiny": str(tmp_path / "tiny")}),
    )
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "LORAFLEET_OBJECT_STORE=s3://" in output and "tiny" in output, output
    assert "Traceback" not in output, output
