"""The one way to run `lorafleet serve` as a child process (tests, benches, the demo): start
on a free port, wait until healthy, kill (SIGKILL) or stop, restart on the same port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from api.client import LorafleetClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerExited(RuntimeError):
    """The server process ended before it became healthy."""


@dataclass
class ServerProcess:
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    extra_args: tuple[str, ...] = ()
    api_key: str | None = None
    start_timeout: float = 120

    @classmethod
    def with_settings(cls, log: Path, **settings: str) -> ServerProcess:
        """A server whose `LORAFLEET_*` settings are given by name (data_dir="…")."""
        env = {**os.environ, **{f"LORAFLEET_{k.upper()}": v for k, v in settings.items()}}
        return cls(env=env, log=log)

    def start(self, same_port: bool = False) -> None:
        self.port = self.port if same_port and self.port else free_port()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "api.cli", "serve", "--port", str(self.port)]
                + list(self.extra_args),
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.start_timeout
        while not self._healthy():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the server did not start in {self.start_timeout} s: {self.log}"
                )
            time.sleep(0.2)

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise ServerExited(f"the server exited:\n{self.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when a machine or container dies."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self, timeout: float = 120) -> None:
        """SIGTERM: a clean shutdown (in the embedded default it also ends the data dir's
        own Ray), within seconds (README: 10 s); SIGKILL after `timeout`."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.Client:
        """A plain httpx client on the server (with the API key, if any)."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, timeout=60, headers=headers)

    def api(self) -> LorafleetClient:
        """lorafleet's own client on the server."""
        return LorafleetClient(self.url, self.api_key)
