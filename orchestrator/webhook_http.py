"""One webhook POST that connects only to an address it checked, within one deadline.

The host is resolved here, every address it resolves to is checked
(orchestrator/webhook_addresses.py), and the connection goes to the checked address: a name
that rebinds between the check and the connect cannot switch it. The URL keeps its host
name, so the Host header, TLS SNI and the certificate check still use the name. Every socket
operation (connect, TLS, write, read) waits at most what is left of one deadline, so a
receiver that trickles or streams forever holds a worker for the deadline at most; at most
`max_body` bytes of its answer are read.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import httpcore

from orchestrator.webhook_addresses import IPAddress, Network, check_address, parse_ip, url_host

# host, port -> the addresses it resolves to (tests give a stub; nothing resolves for real)
Resolver = Callable[[str, int], list[str]]


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def resolve_checked(
    host: str, port: int, resolver: Resolver, allowed: Sequence[Network]
) -> IPAddress:
    """The address to connect to: the literal itself, or the first one `host` resolves to,
    once every address it resolves to passed the check (RefusedAddress otherwise)."""
    literal = parse_ip(host)
    addresses = [literal] if literal is not None else [parse_ip(a) for a in resolver(host, port)]
    checked = [a for a in addresses if a is not None]
    if not checked:
        raise OSError(f"{host} resolves to no address")
    for address in checked:
        check_address(address, allowed)
    return checked[0]


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every wait is cut to what is left of the deadline."""

    def __init__(self, stream: httpcore.NetworkStream, deadline: float) -> None:
        self.stream = stream
        self.deadline = deadline

    def _left(self, timeout: float | None) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout("the delivery deadline passed")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.stream.read(max_bytes, self._left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.stream.write(buffer, self._left(timeout))

    def close(self) -> None:
        self.stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        tls = self.stream.start_tls(ssl_context, server_hostname, self._left(timeout))
        return _DeadlineStream(tls, self.deadline)

    def get_extra_info(self, info: str) -> Any:
        return self.stream.get_extra_info(info)


class _PinnedBackend(httpcore.SyncBackend):
    """Connects to the one checked address, whatever host the URL names."""

    def __init__(self, address: IPAddress, deadline: float) -> None:
        self.address = address
        self.deadline = deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise httpcore.ConnectTimeout("the delivery deadline passed")
        stream = super().connect_tcp(
            str(self.address), port, min(left, timeout or left), local_address, socket_options
        )
        return _DeadlineStream(stream, self.deadline)


@dataclass(frozen=True)
class Answer:
    status_code: int
    body: bytes  # at most max_body bytes of it


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    resolver: Resolver,
    allowed: Sequence[Network],
    deadline_s: float,
    max_body: int,
) -> Answer:
    """POSTs `body` to `url` within `deadline_s` seconds in all (name resolution aside).
    Raises RefusedAddress before connecting to a refused address; httpcore's errors (or
    OSError) when the receiver cannot be reached or does not answer in time."""
    deadline = time.monotonic() + deadline_s
    host, port = url_host(url)
    address = resolve_checked(host, port, resolver, allowed)
    backend = _PinnedBackend(address, deadline)
    timeout = {"connect": deadline_s, "read": deadline_s, "write": deadline_s, "pool": deadline_s}
    pool = httpcore.ConnectionPool(network_backend=backend, max_connections=1, retries=0)
    request = {"headers": headers, "content": body, "extensions": {"timeout": timeout}}
    with pool, pool.stream("POST", url, **request) as response:  # type: ignore[arg-type]
        read = bytearray()
        for chunk in response.iter_stream():
            read += chunk[: max_body - len(read)]
            if len(read) >= max_body:
                break  # the rest is never read: the connection closes with the pool
        return Answer(response.status, bytes(read))
