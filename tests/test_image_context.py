"""The image holds what the project installs: the build context that deploy/Dockerfile sees
(the repository filtered by deploy/Dockerfile.dockerignore, copied here as docker would send
it) has every package and data file, and lorafleet runs from it alone.

No docker is needed: the context is rebuilt from the ignore file's rules, and a fresh
interpreter imports every module, runs `lorafleet --help` and a `serve --no-scheduler` (bound
to 0.0.0.0, opened by a bootstrap API key from a file) with only the context on its path for
lorafleet's own code (the editable install of this checkout is taken out of that interpreter).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from api.server_process import free_port

ROOT = Path(__file__).resolve().parents[1]
IGNORE_FILE = ROOT / "deploy" / "Dockerfile.dockerignore"

# Run first in every child interpreter: the checkout's editable install (a meta-path finder
# and, for some setuptools versions, a path entry) is removed, so lorafleet's modules can come
# only from the build context put first on sys.path.
ISOLATE = """
import sys
ROOT, CONTEXT = sys.argv[1], sys.argv[2]
def _editable(finder):
    names = (type(finder).__module__, getattr(finder, "__module__", None) or "")
    return any("__editable__" in name for name in names)
sys.meta_path[:] = [f for f in sys.meta_path if not _editable(f)]
sys.path[:] = [CONTEXT] + [p for p in sys.path if p and p.rstrip("/") != ROOT]
sys.argv[:] = ["lorafleet"] + sys.argv[3:]
"""

IMPORT_ALL = """
import importlib, json, pathlib
found = []
for package in PACKAGES:
    for path in sorted(pathlib.Path(CONTEXT, package).rglob("*.py")):
        relative = path.relative_to(CONTEXT).with_suffix("")
        if "migrations" in relative.parts:
            continue  # alembic scripts, run by alembic (package data, checked below)
        name = ".".join(relative.parts).removesuffix(".__init__")
        module = importlib.import_module(name)
        assert module.__file__.startswith(CONTEXT), (name, module.__file__)
        found.append(name)
print(json.dumps(found))
"""

CLI = "from api.cli import app\napp()\n"


def ignore_rules() -> list[tuple[bool, str]]:
    """(excludes, pattern) per line of the ignore file, in order."""
    rules = []
    for line in IGNORE_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.removeprefix("!").strip("/")
        rules.append((not negated, pattern))
    return rules


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    # Docker's rules (Go's filepath.Match plus `**`): `*` and `?` stay within one path part,
    # `**` crosses any number of them.
    parts = []
    for part in pattern.split("/"):
        if part == "**":
            parts.append(".*")
        else:  # fnmatch's `*` crosses "/": here it must not
            parts.append(fnmatch.translate(part).removesuffix(r"\Z")[4:-1].replace(".*", "[^/]*"))
    return re.compile("/".join(parts).replace(".*/", "(?:.*/)?") + r"\Z", re.S)


def excluded(relative: str, rules: list[tuple[bool, str]]) -> bool:
    """Whether docker leaves `relative` (posix, from the context root) out: the last rule
    matching it or one of its parent folders decides."""
    prefixes = [relative.split("/")[: i + 1] for i in range(relative.count("/") + 1)]
    verdict = False
    for excludes, pattern in rules:
        regex = _pattern_regex(pattern)
        if any(regex.match("/".join(prefix)) for prefix in prefixes):
            verdict = excludes
    return verdict


def build_context(target: Path) -> None:
    """Copies into `target` what docker would send for deploy/Dockerfile. A folder left out
    whose insides no `!` rule names is not walked (a .venv holds GBs)."""
    rules = ignore_rules()
    reincluded = [pattern for excludes, pattern in rules if not excludes]
    for folder, dirs, files in os.walk(ROOT):
        base = Path(folder).relative_to(ROOT).as_posix()
        base = "" if base == "." else base + "/"
        dirs[:] = [
            d
            for d in dirs
            if not excluded(base + d, rules)
            or any(p.startswith(base + d + "/") or "**" in p for p in reincluded)
        ]
        for name in files:
            if not excluded(base + name, rules):
                destination = target / base / name
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(folder) / name, destination)


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("image-context")
    build_context(target)
    return target


def installed_packages() -> list[str]:
    """The top-level packages `pip install .` puts in the image (pyproject's find rules)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(
        p.name
        for p in ROOT.iterdir()
        if (p / "__init__.py").is_file() and any(fnmatch.fnmatch(p.name, i) for i in include)
    )


def run_from(
    context: Path, code: str, *args: str, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    return subprocess.run(
        [sys.executable, "-I", "-c", ISOLATE + code, str(ROOT), str(context), *args],
        cwd=context,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,  # type: ignore[arg-type]
    )


def test_the_ignore_rules_behave_as_docker_reads_them() -> None:
    rules = [(True, "*"), (False, "api"), (True, "**/__pycache__")]
    assert excluded(".venv", rules) and excluded(".venv/lib/x.py", rules)
    assert not excluded("api", rules) and not excluded("api/routers/jobs.py", rules)
    assert excluded("api/__pycache__/cli.cpython-311.pyc", rules)
    assert excluded("tests/test_deploy.py", rules)


def test_the_context_holds_every_package_and_data_file_the_project_installs(
    context: Path,
) -> None:
    packages = installed_packages()
    assert {"api", "core", "orchestrator", "workers"} <= set(packages)
    for package in packages:
        sources = {p.relative_to(ROOT) for p in (ROOT / package).rglob("*.py")}
        sources = {p for p in sources if "__pycache__" not in p.parts}
        copied = {p.relative_to(context) for p in (context / package).rglob("*.py")}
        assert sources <= copied, f"{package}: missing from the image {sorted(sources - copied)}"
    for data in ("orchestrator/migrations/script.py.mako", "pyproject.toml", "README.md"):
        assert (context / data).is_file(), data
    assert list((context / "orchestrator/migrations/versions").glob("*.py"))
    assert list((context / "api/static").iterdir())
    for left_out in (".venv", "tests", ".git"):
        assert not (context / left_out).exists(), left_out


def test_every_module_imports_from_the_context_alone(context: Path) -> None:
    code = f"PACKAGES = {installed_packages()!r}\n" + IMPORT_ALL
    done = run_from(context, code)
    assert done.returncode == 0, done.stderr[-4000:]
    imported = set(__import__("json").loads(done.stdout.strip().splitlines()[-1]))
    assert {"core.objectstore", "api.cli", "workers.host.pack_host"} <= imported
    assert len(imported) > 50


def test_the_cli_and_an_api_replica_run_from_the_context(context: Path, tmp_path: Path) -> None:
    helped = run_from(context, CLI, "--help")
    assert helped.returncode == 0, helped.stderr[-3000:]
    for command in ("serve", "scheduler", "keys"):
        assert command in helped.stdout

    key = "lf-bootstrap-" + "x" * 24
    (tmp_path / "api-key").write_text(key + "\n")  # as a mounted secret: a final newline
    port = free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAFLEET_", "RAY_ADDRESS"))}
    env.update(
        LORAFLEET_DATA_DIR=str(tmp_path / "state"),
        LORAFLEET_BOOTSTRAP_API_KEY_FILE=str(tmp_path / "api-key"),
        LORAFLEET_BOOTSTRAP_TENANT="ops",
    )
    argv = ["serve", "--no-scheduler", "--host", "0.0.0.0", "--port", str(port)]
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-I", "-c", ISOLATE + CLI, str(ROOT), str(context), *argv],
            cwd=context,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        jobs = f"{url}/v1/fine_tuning/jobs"
        assert httpx.get(jobs).status_code == 401  # closed from the first request
        assert httpx.get(jobs, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert "stored the bootstrap API key" in log.read_text()
    finally:
        server.terminate()
        server.wait(timeout=30)
