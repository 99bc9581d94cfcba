"""Throwaway PostgreSQL cluster for tests of the orchestrator's database layer.

SQLite hides locking and transaction behaviour the control plane relies on, so the
database tests run against a real PostgreSQL started from the Debian binaries: a fresh
cluster in the system temp folder on a free loopback port, fsync off, trust auth, torn
down with ``pg_ctl stop -m immediate``. As root the server runs as the ``postgres`` user
(PostgreSQL refuses to run as root).

Self-check: ``python3 -m tests.services.postgres`` from the repository root.
"""

from __future__ import annotations

import atexit
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

_SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")
_CLIENT_TOOLS = ("psql", "createdb")
_INSTALL_HINT = "apt-get install -y --no-install-recommends postgresql"
_SERVICE_USER = "postgres"
_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

# Runs beside the server and stops it once its stdin reaches EOF, i.e. when the process
# that started the cluster is gone, however it died (atexit does not run on SIGKILL or
# SIGTERM). SIGQUIT is PostgreSQL's immediate shutdown, the same as pg_ctl -m immediate.
# Zombies count as gone: nothing reaps orphans in some containers.
_WATCHDOG = """
import os, shutil, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sys.stdin.buffer.read()
pid_file, base = sys.argv[1], sys.argv[2]
def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
try:
    pid = int(open(pid_file).readline())
    os.kill(pid, signal.SIGQUIT)
    for _ in range(100):
        if not alive(pid):
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
except (OSError, ValueError):
    pass
shutil.rmtree(base, ignore_errors=True)
"""


def _bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding the server tools."""
    found = []
    for path in glob.glob("/usr/lib/postgresql/*/bin"):
        version = Path(path).parent.name
        if version.isdigit() and all((Path(path) / tool).exists() for tool in _SERVER_TOOLS):
            found.append((int(version), Path(path)))
    return max(found)[1] if found else None


def missing() -> str | None:
    """None if PostgreSQL's server and client binaries are installed, else what to install."""
    bindir = _bindir()
    if bindir is None:
        return f"no initdb/pg_ctl under /usr/lib/postgresql/*/bin: {_INSTALL_HINT}"
    absent = [tool for tool in _CLIENT_TOOLS if not (bindir / tool).exists()]
    if absent:
        return f"missing {', '.join(absent)} in {bindir}: {_INSTALL_HINT}"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "runuser is missing (util-linux); needed to run PostgreSQL as root"
        try:
            import pwd

            pwd.getpwnam(_SERVICE_USER)
        except KeyError:
            return f"no '{_SERVICE_USER}' user to run the server as: {_INSTALL_HINT}"
    return None


@dataclass
class Postgres:
    url: str
    port: int
    datadir: Path
    basedir: Path
    bindir: Path
    _watchdog: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        if not _DB_NAME.match(name):
            raise ValueError(f"not a plain PostgreSQL identifier: {name!r}")
        self._client("createdb", name)
        return self.url_for(name)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL through psql; returns unaligned, tuples-only output."""
        return self._client("psql", "-X", "-v", "ON_ERROR_STOP=1", "-At", "-d", database, "-c", sql)

    def stop(self) -> None:
        """Immediate shutdown, then remove the cluster's files. Idempotent."""
        if self._watchdog is None:
            return
        # No fsync, no checkpoint: the data is thrown away anyway.
        subprocess.run(
            _as_service_user(
                [
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.datadir),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ]
            ),
            capture_output=True,
            timeout=60,
        )
        # Killed rather than released: released, it would signal whatever pid a stale
        # postmaster.pid named.
        self._watchdog.kill()
        self._watchdog.wait()
        self._watchdog = None
        shutil.rmtree(self.basedir, ignore_errors=True)
        atexit.unregister(self.stop)

    def _client(self, tool: str, *args: str) -> str:
        # Client tools talk TCP with trust auth, so they need not run as postgres.
        done = subprocess.run(
            [
                str(self.bindir / tool),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{tool} {' '.join(args)} exited with {done.returncode}: {done.stderr.strip()}"
            )
        return done.stdout


def start_postgres() -> Postgres:
    """Start a fresh cluster on a free port; returns once it accepts connections.

    Raises RuntimeError (with the server log's tail) if initdb or the start fails.
    """
    problem = missing()
    if problem:
        raise RuntimeError(problem)
    bindir = _bindir()
    assert bindir is not None
    # The system temp folder, never a root-owned home: the postgres user must be able
    # to enter every parent folder.
    basedir = Path(tempfile.mkdtemp(prefix="lorafleet-pg-"))
    basedir.chmod(0o755)
    datadir, sockdir, logfile = basedir / "data", basedir / "sock", basedir / "postgres.log"
    sockdir.mkdir()
    if os.geteuid() == 0:
        shutil.chown(basedir, user=_SERVICE_USER)
        shutil.chown(sockdir, user=_SERVICE_USER)
    port = _free_port()
    pg = Postgres(
        url=f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres",
        port=port,
        datadir=datadir,
        basedir=basedir,
        bindir=bindir,
    )
    atexit.register(pg.stop)
    pg._watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(datadir / "postmaster.pid"), str(basedir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _run(
            [
                str(bindir / "initdb"),
                "-D",
                str(datadir),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
            basedir,
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {sockdir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        _run(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(datadir),
                "-l",
                str(logfile),
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
            ],
            basedir,
        )
    except BaseException as exc:
        log = _tail(logfile)
        pg.stop()
        if isinstance(exc, (RuntimeError, OSError)):
            raise RuntimeError(
                f"starting PostgreSQL failed: {exc}\n--- {logfile} ---\n{log}"
            ) from exc
        raise
    return pg


def _as_service_user(argv: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; as anyone else it runs as that user.
    if os.geteuid() == 0:
        return ["runuser", "-u", _SERVICE_USER, "--", *argv]
    return argv


def _run(argv: list[str], cwd: Path) -> None:
    # cwd must be enterable by postgres, or initdb fails on "could not change directory".
    try:
        done = subprocess.run(
            _as_service_user(argv), capture_output=True, text=True, timeout=120, cwd=cwd
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{' '.join(argv)} timed out") from exc
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited with {done.returncode}\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _self_check() -> None:
    t = time.monotonic()
    pg = start_postgres()
    started = time.monotonic() - t
    print(f"PostgreSQL up: {pg.url} (data in {pg.datadir})")
    try:
        t = time.monotonic()
        url = pg.create_database("lorafleet_selfcheck")
        created = time.monotonic() - t
        print(f"created {url}")
        t = time.monotonic()
        out = pg.psql("SELECT 1", database="lorafleet_selfcheck").strip()
        queried = time.monotonic() - t
        assert out == "1", out
        print(f"SELECT 1 -> {out}; {pg.psql('SHOW fsync').strip()=}")
    finally:
        t = time.monotonic()
        pg.stop()
        stopped = time.monotonic() - t
    assert not pg.basedir.exists(), "cluster folder left behind"
    for name, seconds in [
        ("start_postgres", started),
        ("create_database", created),
        ("psql SELECT 1", queried),
        ("stop", stopped),
    ]:
        print(f"  {name:20s} {seconds:6.2f} s")
    print("postgres self-check passed")


if __name__ == "__main__":
    _self_check()
