"""What every tenant-scoped request passes before its key is looked up: a per-key request
rate (token bucket) and, while the server is open (no API key created yet), a Host check;
and, before every route, no NUL character where a database would see it.

Open mode serves anyone who reaches it, which is safe only on loopback; but a web page can
reach loopback too, through DNS rebinding (its own name re-pointed at 127.0.0.1). The
browser then still sends the page's name as Host, so only loopback names are served.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request

from orchestrator.errors import Forbidden, InvalidRequest, RateLimited

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
MAX_BUCKETS = 100_000  # keys remembered; past it all are forgotten (each starts full again)


def host_name(host_header: str) -> str:
    """`Host`'s name without its port: "[::1]:8000" → "::1", "LocalHost.:80" → "localhost"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rpartition(":")[0].rstrip(".") if ":" in host else host.rstrip(".")


def check_open_mode_host(host_header: str | None, allowed: tuple[str, ...]) -> None:
    """Forbidden unless the request names this machine by a loopback name (open mode)."""
    name = host_name(host_header or "")
    if name not in allowed:
        raise Forbidden(
            f"this server has no API key yet, so it answers only requests addressed to "
            f"{', '.join(allowed)} (the Host header named {name!r}); create a key with "
            "`lorafleet keys create` to serve other names",
            param="Host",
        )


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """A token bucket per key: `burst` requests at once, refilled at `per_second`."""

    def __init__(
        self, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_second = per_second
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> None:
        """Takes one request's token; RateLimited (with the wait) when there is none."""
        if self.per_second <= 0:
            return
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= MAX_BUCKETS:
                    self._buckets.clear()
                bucket = self._buckets[key] = _Bucket(float(self.burst), now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.per_second)
            bucket.at = now
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return
            wait = (1 - bucket.tokens) / self.per_second
        raise RateLimited(
            f"too many requests for this API key: at most {self.per_second:g} a second "
            f"(bursts of {self.burst}); retry after {wait:.1f} s",
            retry_after=wait,
        )


def refuse_nul_characters(request: Request) -> None:
    """A NUL character in the path, the query or a header is a 400 naming where it was:
    PostgreSQL refuses NUL in text outright (DataError, which would be a 500), and no id,
    filter or key of ours holds one."""
    if "\x00" in request.url.path:
        raise InvalidRequest("the path must not contain NUL characters", param="path")
    for name, value in request.query_params.multi_items():
        if "\x00" in name or "\x00" in value:
            raise InvalidRequest("query parameters must not contain NUL characters", name)
    for name, value in request.headers.items():
        if "\x00" in value:
            raise InvalidRequest("headers must not contain NUL characters", param=name)
