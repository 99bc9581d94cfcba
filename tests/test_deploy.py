"""deploy/ stays valid: every file parses, and the files agree with each other and with the code.

Nothing here builds an image or starts a cluster (deploy/RUNBOOK.md does that); these checks catch
the mistakes that otherwise show up only at deploy time: a renamed setting, a dangling
`depends_on`, a Service that selects no pod, a Secret key nobody creates.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
CONTROL_PLANE = DEPLOY / "kuberay" / "lorafleet.yaml"
RUNBOOK = DEPLOY / "RUNBOOK.md"
YAML_FILES = sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))

ENV_PREFIX = "LORAFLEET_"


# --- helpers ------------------------------------------------------------------------------------


def yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_object(path: Path, kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in yaml_documents(path) if doc.get("kind") == kind]
    return found


def setting_fields() -> set[str]:
    from orchestrator.settings import Settings

    assert Settings.model_config.get("env_prefix") == ENV_PREFIX
    assert not Settings.model_config.get("case_sensitive"), "the LORAFLEET_FOO -> foo mapping"
    return set(Settings.model_fields)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuations joined and ARG defaults substituted."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    defaults: dict[str, str] = {}
    for line in filter(None, map(str.strip, text.splitlines())):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name.strip()] = value.strip()
        for name, value in defaults.items():
            args = args.replace("${" + name + "}", value)
        instructions.append((keyword, args.strip()))
    return instructions


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "ENV":
            env.update(item.partition("=")[::2] for item in shlex.split(args))
    return env


def argv(command: str | list[str] | None) -> list[str]:
    """A command as its words: a YAML list, a JSON exec form (Dockerfile) or a shell string."""
    if command is None:
        return []
    if isinstance(command, str):
        return json.loads(command) if command.startswith("[") else shlex.split(command)
    return [str(a) for a in command]


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def containers(path: Path) -> list[dict[str, Any]]:
    """Every container spec in a manifest: Deployments and both kinds of RayCluster group."""
    found = []
    for doc in yaml_documents(path):
        if doc.get("kind") == "Deployment":
            found += doc["spec"]["template"]["spec"]["containers"]
        if doc.get("kind") == "RayCluster":
            groups = [doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]]
            for group in groups:
                found += group["template"]["spec"]["containers"]
    return found


# --- every file ---------------------------------------------------------------------------------


def test_deploy_has_the_expected_files() -> None:
    for path in (DOCKERFILE, COMPOSE, RAYCLUSTER, CONTROL_PLANE, RUNBOOK):
        assert path.is_file(), path


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_document_loads(path: Path) -> None:
    documents = yaml_documents(path)
    assert documents, f"{path} has no documents"
    assert all(isinstance(doc, dict) for doc in documents)


def test_every_lorafleet_variable_is_a_setting() -> None:
    fields = setting_fields()
    used = {
        (name, path.relative_to(DEPLOY))
        for path in DEPLOY.rglob("*")
        if path.is_file()
        for name in re.findall(rf"\b{ENV_PREFIX}[A-Z0-9_]*[A-Z0-9]\b", path.read_text())
    }
    assert len({name for name, _ in used}) >= 5, "deploy/ should wire lorafleet through settings"
    unknown = sorted(
        f"{name} ({where})"
        for name, where in used
        if name.removeprefix(ENV_PREFIX).lower() not in fields
    )
    assert not unknown, f"not fields of orchestrator.settings.Settings: {unknown}"


# --- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_installs_pinned_torch_before_deepspeed_without_build_isolation() -> None:
    runs = [args for keyword, args in dockerfile_instructions() if keyword == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if re.search(r"\btorch==\d+(\.\d+)+", r))
    deepspeed_at = next(i for i, r in enumerate(runs) if re.search(r"\bdeepspeed==\d", r))
    assert torch_at < deepspeed_at, "torch must be installed in an earlier step than deepspeed"
    assert "--no-build-isolation" in runs[deepspeed_at]
    assert "--index-url" in runs[torch_at], "torch must come from the index matching the image"


def test_dockerfile_pins_satisfy_pyproject() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = {Requirement(d).name: Requirement(d) for d in pyproject["project"]["dependencies"]}
    pins = [
        (Requirement(f"{name}=={version}").name, version)
        for keyword, args in dockerfile_instructions()
        if keyword == "RUN" and "pip install" in args
        for name, version in re.findall(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][^\s\"']*)", args)
    ]
    assert {"torch", "deepspeed", "ray"} <= {name for name, _ in pins}
    for name, version in pins:
        assert name in wanted, f"{name} is pinned in the image but not a dependency"
        assert wanted[name].specifier.contains(version), f"{name}=={version} vs {wanted[name]}"


def test_dockerfile_chooses_cpu_or_cuda_torch_with_the_base_image() -> None:
    raw = DOCKERFILE.read_text()
    base = re.search(r"^FROM\s+(\S+)", raw, re.M)
    torch_index = re.search(r"--index-url\s+\"?(\S+?)\"?\s", raw)
    assert base and torch_index
    shared = set(re.findall(r"\$\{(\w+)\}", base[1])) & set(
        re.findall(r"\$\{(\w+)\}", torch_index[1])
    )
    assert shared, "one build arg must choose both the base image and the torch build"
    (arg,) = shared
    assert re.search(rf"^ARG {arg}=cpu$", raw, re.M), f"{arg} should default to a CPU build"


def test_dockerfile_runs_as_non_root_and_checks_api_health() -> None:
    instructions = dockerfile_instructions()
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1] not in {"root", "0"}
    (healthcheck,) = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert "/healthz" in healthcheck
    base = next(args for keyword, args in instructions if keyword == "FROM")
    assert base.startswith(("rayproject/ray:", "python:3.11")), base


# --- docker-compose.yml -------------------------------------------------------------------------


def test_compose_has_the_stack_and_dependencies_exist() -> None:
    services = compose()["services"]
    assert {"api", "scheduler", "postgres", "s3", "ray-head", "ray-worker"} <= set(services)
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        for target in depends_on:
            assert target in services, f"{name} depends on unknown service {target}"
            condition = (
                depends_on[target].get("condition") if isinstance(depends_on, dict) else None
            )
            if condition == "service_healthy":
                check = services[target].get("healthcheck", {})
                assert check.get("test") and not check.get("disable"), (
                    f"{name} waits for {target} to be healthy, but {target} has no healthcheck"
                )
    assert {"postgres", "s3"} <= set(services["api"]["depends_on"])
    assert {"postgres", "ray-head"} <= set(services["scheduler"]["depends_on"])
    assert services["postgres"]["image"].startswith("postgres:15")


def address_host(value: str) -> str | None:
    """The host of a URL or of a bare `host:port` (a Ray GCS address)."""
    return urlparse(value if "://" in value else f"//{value}").hostname


def test_compose_addresses_name_compose_services() -> None:
    services = compose()["services"]
    hosts = []
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            # A public endpoint is for the user's machine, not for the services (below).
            wired = key.startswith(ENV_PREFIX) and key.endswith(("_URL", "_ADDRESS"))
            if wired and "_PUBLIC_" not in key:
                hosts.append((f"{name}: {key}", address_host(str(value))))
        for arg in argv(service.get("command")):
            if arg.startswith("--address="):
                hosts.append((f"{name}: {arg}", arg.partition("=")[2].rpartition(":")[0]))
    assert len(hosts) >= 4
    for where, host in hosts:
        assert host in services, f"{where} points at {host!r}, not a compose service"


def compose_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source of each short-syntax volume, "source:/target[:ro|:rw]"."""
    mounts = {}
    for volume in service.get("volumes", []):
        # The source may hold a ${VAR:-default} with colons of its own.
        found = re.fullmatch(r"(.+?):(/[^:]*)(?::r[ow])?", str(volume))
        assert found, f"unexpected volume syntax {volume!r}"
        mounts[found[2]] = found[1]
    return mounts


def compose_lorafleet_nodes() -> dict[str, dict[str, Any]]:
    """The lorafleet processes and the Ray nodes: every service that reads a base model."""
    return {
        name: service
        for name, service in compose()["services"].items()
        if argv(service.get("command"))[:2]
        in (["lorafleet", "serve"], ["lorafleet", "scheduler"], ["ray", "start"])
    }


def test_compose_base_models_are_on_a_shared_path_every_node_mounts() -> None:
    nodes = compose_lorafleet_nodes()
    assert {"api", "scheduler", "ray-head", "ray-worker"} <= set(nodes)
    env = nodes["api"]["environment"]
    catalog = json.loads(env[f"{ENV_PREFIX}BASE_MODELS"])
    shared = json.loads(env.get(f"{ENV_PREFIX}SHARED_PATHS", "[]"))
    for name, service in nodes.items():
        for model, location in catalog.items():
            if location.startswith("s3://"):
                continue
            mounted = [t for t in compose_mounts(service) if location.startswith(t + "/")]
            assert mounted, f"{name}: base model {model} at {location} is on no volume"
            assert any(location.startswith(p.rstrip("/") + "/") for p in shared), (
                f"{model} at {location}: not under LORAFLEET_SHARED_PATHS {shared}"
            )


def test_compose_scheduler_is_a_ray_driver_on_the_heads_node() -> None:
    services = compose()["services"]
    scheduler, head = services["scheduler"], services["ray-head"]
    assert argv(scheduler["command"]) == ["lorafleet", "scheduler"]
    address = scheduler["environment"][f"{ENV_PREFIX}RAY_ADDRESS"]
    assert "://" not in address, "the GCS address, never Ray Client (ray://)"
    assert address_host(address) == "ray-head"
    assert "--port=" + address.rpartition(":")[2] in argv(head["command"])
    # A driver attaches to the raylet of its own node: the head's network and its /tmp/ray.
    assert scheduler["network_mode"] == "service:ray-head"
    assert compose_mounts(scheduler)["/tmp/ray"] == compose_mounts(head)["/tmp/ray"]
    for name, service in services.items():
        for word in argv(service.get("command")):
            assert "ray-client-server" not in word and "ray://" not in word, name


def test_compose_api_opens_with_a_bootstrap_key_and_presigns_for_the_users_machine() -> None:
    services = compose()["services"]
    api = services["api"]
    words = argv(api["command"])
    assert words[:2] == ["lorafleet", "serve"] and "--no-scheduler" in words
    assert words[words.index("--host") + 1] == "0.0.0.0"
    assert api["environment"][f"{ENV_PREFIX}BOOTSTRAP_API_KEY"].startswith("${API_KEY:?")
    public = urlparse(
        re.sub(r"\$\{\w+:-(.*)\}", r"\1", api["environment"][f"{ENV_PREFIX}S3_PUBLIC_ENDPOINT_URL"])
    )
    assert public.hostname in ("127.0.0.1", "localhost")
    assert f"{public.port}:9000" in services["s3"]["ports"]


# --- KubeRay ------------------------------------------------------------------------------------


def test_raycluster_has_head_and_gpu_workers_with_nccl_and_shared_memory() -> None:
    cluster = k8s_object(RAYCLUSTER, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    gpu_groups = [
        group
        for group in cluster["spec"]["workerGroupSpecs"]
        for c in group["template"]["spec"]["containers"]
        if int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1
    ]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for group in gpu_groups:
        spec = group["template"]["spec"]
        shm_volumes = {
            v["name"] for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"
        }
        (container,) = spec["containers"]
        assert any(
            m["mountPath"] == "/dev/shm" and m["name"] in shm_volumes
            for m in container["volumeMounts"]
        ), "GPU workers need /dev/shm backed by memory"
        assert "NCCL_DEBUG" in {e["name"] for e in container.get("env", [])}
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())


def test_api_deployment_probes_healthz_and_the_service_selects_it() -> None:
    deployment = k8s_object(CONTROL_PLANE, "Deployment")
    service = k8s_object(CONTROL_PLANE, "Service")
    pod = deployment["spec"]["template"]
    (api,) = pod["spec"]["containers"]
    assert api["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    port_names = {p.get("name") for p in api["ports"]} | {p["containerPort"] for p in api["ports"]}
    assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])


def head_containers() -> dict[str, dict[str, Any]]:
    cluster = k8s_object(RAYCLUSTER, "RayCluster")
    pod = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"]}


def test_the_scheduler_runs_in_the_head_pod_by_the_gcs_address() -> None:
    cluster = k8s_object(RAYCLUSTER, "RayCluster")
    config = k8s_object(CONTROL_PLANE, "ConfigMap")["data"]
    raw = config[f"{ENV_PREFIX}RAY_ADDRESS"]
    assert "://" not in raw, "the GCS address, never Ray Client (ray://)"
    address = urlparse(f"//{raw}")
    assert address.hostname == f"{cluster['metadata']['name']}-head-svc"
    containers = head_containers()
    head, scheduler = containers["ray-head"], containers["scheduler"]
    assert address.port in {p["containerPort"] for p in head["ports"]}
    assert scheduler["command"] == ["lorafleet", "scheduler"]
    # A driver attaches to its node's raylet, whose socket is under /tmp/ray.
    mounts = [{m["mountPath"]: m["name"] for m in c["volumeMounts"]} for c in (head, scheduler)]
    assert mounts[0]["/tmp/ray"] == mounts[1]["/tmp/ray"]
    assert all(
        uri.startswith("s3://") for uri in json.loads(config[f"{ENV_PREFIX}BASE_MODELS"]).values()
    )


def test_no_pod_needs_a_shared_volume_and_gpu_pods_cache_models() -> None:
    # Checkpoints and adapters live in the object store: no ReadWriteMany claim to provision.
    for path in (CONTROL_PLANE, RAYCLUSTER):
        assert not [d for d in yaml_documents(path) if d.get("kind") == "PersistentVolumeClaim"]
        assert "persistentVolumeClaim" not in path.read_text()
    config = k8s_object(CONTROL_PLANE, "ConfigMap")["data"]
    for setting in ("DATA_DIR", "MODEL_CACHE_DIR"):
        assert config[f"{ENV_PREFIX}{setting}"].startswith("/"), "relative: refused on a cluster"
    cluster = k8s_object(RAYCLUSTER, "RayCluster")
    for group in cluster["spec"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        mounted = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert config[f"{ENV_PREFIX}MODEL_CACHE_DIR"] in mounted, f"{group['groupName']}"


def test_the_api_replicas_start_closed_with_the_bootstrap_key() -> None:
    deployment = k8s_object(CONTROL_PLANE, "Deployment")
    (api,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "--no-scheduler" in api["command"] and "0.0.0.0" in api["command"]
    env = {e["name"]: e for e in api["env"]}
    assert env[f"{ENV_PREFIX}BOOTSTRAP_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "api-key"
    assert "initContainers" not in deployment["spec"]["template"]["spec"], "the API needs no Ray"


def test_manifests_use_only_the_secret_keys_and_config_map_the_runbook_creates() -> None:
    config_map = k8s_object(CONTROL_PLANE, "ConfigMap")["metadata"]["name"]
    runbook = RUNBOOK.read_text()
    created = re.search(r"create secret generic (\S+)", runbook)
    assert created, "RUNBOOK.md should show how to create the Secret"
    secret, keys = created[1], set(re.findall(r"--from-literal=([\w-]+)=", runbook))
    every = containers(CONTROL_PLANE) + containers(RAYCLUSTER)
    assert len(every) >= 3
    for container in every:
        for ref in container.get("envFrom", []):
            assert ref["configMapRef"]["name"] == config_map
        for env in container.get("env", []):
            if ref := env.get("valueFrom", {}).get("secretKeyRef"):
                assert (ref["name"], ref["key"]) in {(secret, k) for k in keys}, env["name"]
    (api,) = containers(CONTROL_PLANE)
    assert {e["name"] for e in api["env"]} >= {
        f"{ENV_PREFIX}DATABASE_URL",
        f"{ENV_PREFIX}S3_SECRET_ACCESS_KEY",
    }


# --- the CLI ------------------------------------------------------------------------------------


def referenced_lorafleet_commands() -> set[str]:
    commands = [argv(args) for keyword, args in dockerfile_instructions() if keyword == "CMD"]
    commands += [argv(s.get("command")) for s in compose()["services"].values()]
    commands += [
        c.get("command", []) + c.get("args", [])
        for c in containers(CONTROL_PLANE) + containers(RAYCLUSTER)
    ]
    in_code_blocks = re.findall(r"^```\w*\n(.*?)^```", RUNBOOK.read_text(), re.M | re.S)
    commands += [
        shlex.split(ln.lstrip("$ "))
        for block in in_code_blocks
        for ln in block.splitlines()
        if ln.lstrip("$ ").startswith("lorafleet ")
    ]
    return {c[1] for c in commands if len(c) > 1 and c[0] == "lorafleet"}


def test_referenced_subcommands_exist() -> None:
    import typer.main

    from api.cli import app

    referenced = referenced_lorafleet_commands()
    assert {"serve", "scheduler"} <= referenced
    group = typer.main.get_command(app)
    available = set(getattr(group, "commands", {}))
    assert referenced <= available, (
        f"deploy/ runs {referenced - available}, the CLI has {available}"
    )


# --- a cluster is settings only ----------------------------------------------------------------


def interpolated(value: str) -> str:
    """A compose value with ${VAR:-default} as its default and ${VAR:?…} as a stand-in."""
    value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{\w+:\?[^}]*\}", "stand-in-secret-of-enough-characters", value)


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    from orchestrator.settings import Settings

    for name in [n for n in os.environ if n.startswith((ENV_PREFIX, "RAY_"))]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith(ENV_PREFIX):
            monkeypatch.setenv(name, interpolated(str(value)))
    # The image's defaults, as the containers have them.
    monkeypatch.setenv(f"{ENV_PREFIX}DATA_DIR", dockerfile_env()[f"{ENV_PREFIX}DATA_DIR"])
    if f"{ENV_PREFIX}DATA_DIR" in env:
        monkeypatch.setenv(f"{ENV_PREFIX}DATA_DIR", str(env[f"{ENV_PREFIX}DATA_DIR"]))
    return Settings()


@pytest.mark.parametrize("service", ["api", "scheduler"])
def test_compose_settings_pass_the_cluster_check(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.cluster_settings import cluster_address, problems

    settings = settings_from(compose()["services"][service]["environment"], monkeypatch)
    address = cluster_address(settings)
    assert address is not None
    assert problems(settings, address) == []


def test_kuberay_settings_pass_the_cluster_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.cluster_settings import cluster_address, problems

    config = k8s_object(CONTROL_PLANE, "ConfigMap")["data"]
    settings = settings_from(config, monkeypatch)
    address = cluster_address(settings)
    assert address is not None
    assert problems(settings, address) == []
