"""The embedded default's Ray: a local cluster run as a process of its own, not inside serve.

`ray.init(address="local")` would make the serve process the cluster's owner: a SIGKILLed
serve would take Ray and every warm pack host with it (and orphan Ray's agent processes).
Instead serve starts `ray start --head --block` in a session of its own and records it in
`DATA_DIR/ray-head.json`; a restarted serve finds the record, checks that the process is
alive and the cluster answers, and reconnects. A clean shutdown ends that recorded process
(`ray start --block` ends its own children on SIGTERM), never `ray stop`, which would end
every Ray on the machine, and never by name. The record is written as soon as the process
exists, so a start cut short (Ctrl-C, a stopping scheduler: `abort`) never leaves a Ray
that nothing knows of.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RECORD = "ray-head.json"
READY_LINE = "This command will now block forever"  # `ray start --block`: all started
START_TIMEOUT_S = 180.0  # ~5 s idle; 30 s seen on 2 cores under load 11
START_ATTEMPTS = 3
# A clean stop gives the head this long to end its processes, then kills what is left:
# ending this private cluster is the point, so there is nothing to drain for (its pack
# hosts end with it either way, and their jobs resume from checkpoints under the next serve).
STOP_TIMEOUT_S = 5.0
# Given to `ray start`: on SIGTERM Ray drains a node for 30 s by default (for Ray Serve
# replicas to move away), which alone made a SIGTERMed serve take over 30 s to exit.
NO_DRAIN = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
ORPHAN_GRACE_S = 5.0  # once the head has ended, how long the rest of its session may take


class StartAborted(RuntimeError):
    """The caller stopped (its `abort` was set) before its Ray was up; nothing is left."""


@dataclass(frozen=True)
class EmbeddedRay:
    """One `ray start --head --block` process this data dir started."""

    address: str  # the GCS, host:port
    pid: int  # `ray start`, leader of its own session: every Ray process of it is in it
    start_ticks: int  # the process's start time (/proc), so a reused pid is not taken for it
    temp_dir: str  # Ray's session files (short: Unix socket paths are limited to ~107 chars)
    log: str

    def alive(self) -> bool:
        return _start_ticks(self.pid) == self.start_ticks

    def answers(self, timeout: float = 2.0) -> bool:
        host, port = self.address.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=timeout):
                return True
        except OSError:
            return False

    def processes(self) -> list[int]:
        """Pids of this Ray's processes now (its session), the head's included."""
        return session_pids(self.pid) if self.alive() else []


def start_or_adopt(
    data_dir: Path, num_cpus: int, abort: threading.Event | None = None
) -> EmbeddedRay:
    """The data dir's Ray: the recorded one if it is alive and answers, else a new one.
    `abort` set while starting (the caller is stopping): what started is ended, and
    `StartAborted` raised."""
    data_dir.mkdir(parents=True, exist_ok=True)
    # A Ray auth token in the home folder (~/.ray/auth_token) makes `ray start` require
    # tokens, which the driver does not send unless told: every call fails with
    # InvalidAuthToken and jobs never start. Both sides follow RAY_AUTH_MODE; unset, this
    # private cluster on 127.0.0.1 runs without (set here, `ray start` inherits it).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with _locked(data_dir):  # two processes on one data dir never start two clusters
        recorded = read_record(data_dir)
        if recorded is not None and recorded.alive() and recorded.answers():
            log.info("reconnecting to this data dir's Ray (pid %s)", recorded.pid)
            return recorded
        if recorded is not None:  # dead, or alive and deaf: end what is left of it
            _end(recorded)
        for attempt in range(1, START_ATTEMPTS + 1):
            if abort is not None and abort.is_set():
                raise StartAborted("Ray's start was abandoned: its caller is stopping")
            try:
                return _start(data_dir, num_cpus, abort)
            except StartAborted:
                raise
            except RuntimeError:
                # Ray gives its raylet 30 s to register, which a loaded machine can miss.
                if attempt == START_ATTEMPTS:
                    raise
                log.warning("Ray did not start (attempt %s); trying again", attempt)
        raise AssertionError("unreachable")  # the last attempt returned or raised


def stop(data_dir: Path) -> None:
    """Ends the data dir's recorded Ray (all of its processes) and forgets it."""
    if not data_dir.is_dir():  # nothing was ever started there
        return
    with _locked(data_dir):
        recorded = read_record(data_dir)
        if recorded is None:
            return
        _end(recorded)
        (data_dir / RECORD).unlink(missing_ok=True)


def read_record(data_dir: Path) -> EmbeddedRay | None:
    try:
        return EmbeddedRay(**json.loads((data_dir / RECORD).read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def session_pids(session_id: int) -> list[int]:
    """Processes whose session is `session_id` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat_fields(int(entry))
            if stat is not None and int(stat[3]) == session_id:
                found.append(int(entry))
    return found


def _start(data_dir: Path, num_cpus: int, abort: threading.Event | None) -> EmbeddedRay:
    temp_dir = tempfile.mkdtemp(prefix="lorafleet-ray-")
    port, client_port, agent_port = _free_ports(3)
    log_path = data_dir / "ray-head.log"
    ray_cli = Path(sys.executable).with_name("ray")
    command = [
        str(ray_cli) if ray_cli.exists() else "ray",
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--num-cpus={num_cpus}",
        "--include-dashboard=false",
        f"--temp-dir={temp_dir}",
        "--node-ip-address=127.0.0.1",
        # Fixed defaults (10001, 52365) would clash with another Ray on the same machine.
        f"--ray-client-server-port={client_port}",
        f"--dashboard-agent-listen-port={agent_port}",
        "--disable-usage-stats",
    ]
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            command,
            env={**os.environ, **NO_DRAIN},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not in serve's process group: Ctrl-C/kill reach serve only
        )
    ray = EmbeddedRay(
        address=f"127.0.0.1:{port}",
        pid=process.pid,
        start_ticks=_start_ticks(process.pid) or 0,
        temp_dir=temp_dir,
        log=str(log_path),
    )
    (data_dir / RECORD).write_text(json.dumps(asdict(ray)))  # known from its first moment
    log.info("starting this data dir's Ray (pid %s, %s)", process.pid, ray.address)
    try:
        _wait_until_ready(ray, process, log_path, offset, abort)
    except BaseException:  # failed, timed out, aborted, or Ctrl-C: end what it started
        _end(ray)
        (data_dir / RECORD).unlink(missing_ok=True)
        raise
    return ray


def _wait_until_ready(
    ray: EmbeddedRay,
    process: subprocess.Popen[bytes],
    log_path: Path,
    offset: int,
    abort: threading.Event | None,
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while READY_LINE not in _read_from(log_path, offset):
        if process.poll() is not None:
            raise RuntimeError(f"`ray start` exited with {process.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray did not start in {START_TIMEOUT_S:g} s; see {log_path}")
        if abort is not None and abort.is_set():
            raise StartAborted(f"Ray's start (pid {ray.pid}) was abandoned: its caller is stopping")
        time.sleep(0.2)


def _end(ray: EmbeddedRay) -> None:
    """SIGTERM to the head (it ends its children), then SIGKILL to whatever of its session
    is left after the timeout, or soon after the head itself ended (a head stopped while it
    was still starting leaves its children); then its session files."""
    if ray.alive():
        _signal(ray.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and session_pids(ray.pid):
            _reap(ray.pid)
            if not ray.alive():
                deadline = min(deadline, time.monotonic() + ORPHAN_GRACE_S)
            time.sleep(0.2)
    _reap(ray.pid)
    # Processes in the head's session are this Ray's, while the head lives or its pid is
    # unused (a session id is its leader's pid: a reused pid may lead another session).
    if ray.alive() or not Path(f"/proc/{ray.pid}").exists():
        for pid in session_pids(ray.pid):
            log.warning("Ray process %s outlived its head; killing it", pid)
            _signal(pid, signal.SIGKILL)
    shutil.rmtree(ray.temp_dir, ignore_errors=True)


def _reap(pid: int) -> None:
    """Collects the head's exit status if this process started it (else init does)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, pgrp, session, …]."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return None if fields[0] == "Z" else fields  # a zombie has ended


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has ended)."""
    return _stat_fields(pid) is not None


def _start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace")


class _locked:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "ray-head.lock"

    def __enter__(self) -> None:
        self.handle = open(self.path, "a+")  # noqa: SIM115 - closed in __exit__
        fcntl.flock(self.handle, fcntl.LOCK_EX)

    def __exit__(self, *_: object) -> None:
        self.handle.close()
