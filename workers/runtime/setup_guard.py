"""A time limit per setup phase of a pack host's workers, so that setup can fail but never hang.

Setup can block in places we do not own (seen: DeepSpeed waiting forever on a build lock
left by a killed compile). Each phase runs under a timer; past the limit the timer raises
`SetupTimeoutError` inside the training thread (an asynchronous exception: it lands at the
thread's next Python bytecode, which covers the lock-polling loops that hang), and the host's
actor is told, so every job on the host fails with an error naming the phase
(`workers.host.worker_loop.HostWorker.setup`).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger("lorafleet.worker")


class SetupTimeoutError(TimeoutError):
    """A setup phase took longer than the setup time limit."""


class _PhaseExpired(BaseException):
    """What the timer raises in the setup thread: not an `Exception`, so that no library's
    `except Exception` the thread happens to be in (an import's fallbacks) swallows it; the
    phase turns it into a SetupTimeoutError."""


class SetupPhases:
    def __init__(self, limit_s: float, on_timeout: Callable[[str, str], None]) -> None:
        self.limit_s = limit_s
        self.on_timeout = on_timeout  # (phase, error) → tells the host's actor
        self.current: str | None = None
        self.timed_out: str | None = None

    def _message(self, phase: str) -> str:
        return f"setup phase {phase!r} took longer than {self.limit_s:g} s (setup time limit)"

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.current = name
        thread_id = threading.get_ident()

        def expire() -> None:
            self.timed_out = name
            error = self._message(name)
            logger.error("%s; failing the host's jobs", error)
            try:
                self.on_timeout(name, error)
            finally:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(thread_id), ctypes.py_object(_PhaseExpired)
                )

        timer = threading.Timer(self.limit_s, expire)
        timer.daemon = True
        timer.start()
        try:
            yield
        except (_PhaseExpired, SetupTimeoutError) as exc:
            raise SetupTimeoutError(self._message(name)) from exc
        finally:
            timer.cancel()
            self.current = None
