"""Which addresses a webhook may reach (pure): none inside the cluster's network.

A tenant's webhook URL makes the delivery worker connect wherever it names, so every
address class that reaches inside is refused: loopback, private, link-local (with the cloud
metadata address), shared CGNAT space, multicast, unspecified and reserved, in IPv4 and IPv6,
an IPv4 address inside IPv6 (mapped, compatible, NAT64) judged as the IPv4 address it holds.
IPv4 is read in every spelling a resolver or URL parser accepts (`127.1`, `2130706433`,
`0x7f.1`, `0177.0.0.1`), so no spelling slips past. An operator allow-lists networks of
internal receivers (LORAFLEET_WEBHOOK_ALLOWED_NETWORKS).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
METADATA = {ipaddress.IPv4Address("169.254.169.254"), ipaddress.IPv6Address("fd00:ec2::254")}
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
LOOPBACK_NAMES = ("localhost", "localhost.", "ip6-localhost", "ip6-loopback")
SCHEMES = ("http", "https")


class RefusedAddress(ValueError):
    """The URL names, or resolves to, an address webhooks may not reach."""


def parse_networks(networks: Sequence[str]) -> list[Network]:
    return [ipaddress.ip_network(n, strict=False) for n in networks]


def _ipv4_part(part: str) -> int | None:
    """One dotted part as inet_aton reads it: 0x… hex, 0… octal, else decimal."""
    try:
        if part[:2].lower() == "0x":
            return int(part[2:] or "0", 16)
        if len(part) > 1 and part.startswith("0"):
            return int(part[1:], 8)
        return int(part, 10) if part.isdigit() else None
    except ValueError:
        return None


def parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """`host` as an IPv4 address in any inet_aton spelling (1 to 4 parts, the last filling
    the remaining bytes), or None when it is not one."""
    parts = host.removesuffix(".").split(".")
    if not 1 <= len(parts) <= 4 or any(not p for p in parts):
        return None
    values = [_ipv4_part(p) for p in parts]
    if any(v is None for v in values):
        return None
    numbers = [v for v in values if v is not None]
    *head, last = numbers
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    value = 0
    for v in head:
        value = value << 8 | v
    return ipaddress.IPv4Address(value << 8 * (4 - len(head)) | last)


def parse_ip(host: str) -> IPAddress | None:
    """An IP literal in any spelling (IPv6 with or without brackets), else None."""
    bare = host.strip("[]")
    if ":" in bare:
        if "%" in bare:  # a zone id names an interface of this machine
            raise RefusedAddress("an IPv6 zone id is not allowed")
        try:
            return ipaddress.IPv6Address(bare)
        except ValueError:
            return None
    return parse_ipv4(bare)


def _embedded_ipv4(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (mapped, compatible, NAT64), or itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in NAT64 or (address in IPV4_COMPATIBLE and int(address) > 1):
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def refused_class(address: IPAddress, allowed: Sequence[Network] = ()) -> str | None:
    """The class that makes `address` unreachable for webhooks, or None if it may be used."""
    address = _embedded_ipv4(address)
    if any(address.version == n.version and address in n for n in allowed):
        return None
    checks = (
        (address in METADATA, "cloud metadata"),
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (isinstance(address, ipaddress.IPv4Address) and address in CGNAT, "shared (CGNAT)"),
        (address.is_reserved, "reserved"),
        (address.is_private, "private"),
        (not address.is_global, "reserved"),  # documentation, benchmarking, …
    )
    return next((name for refused, name in checks if refused), None)


def check_address(address: IPAddress, allowed: Sequence[Network] = ()) -> None:
    refused = refused_class(address, allowed)
    if refused:
        raise RefusedAddress(f"{refused} addresses are not allowed")


def url_host(url: str) -> tuple[str, int]:
    """The host and port a webhook URL names; RefusedAddress if it is not http(s)."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise RefusedAddress("must be an http or https URL with a host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise RefusedAddress("has an invalid port") from exc
    return parts.hostname, port


def check_url(url: str, allowed: Sequence[Network] = ()) -> None:
    """At registration: refuses a URL whose host is a refused address in any spelling (or a
    loopback name). A DNS name is checked again at each delivery, after it is resolved."""
    host, _ = url_host(url)
    name = host.lower()
    if name in LOOPBACK_NAMES or name.rstrip(".").endswith(".localhost"):
        check_address(ipaddress.IPv4Address("127.0.0.1"), allowed)
        return
    address = parse_ip(host)
    if address is not None:
        check_address(address, allowed)
