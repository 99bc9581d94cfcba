"""Which addresses a webhook may reach: every refused class in every spelling (pure)."""

from __future__ import annotations

import ipaddress

import pytest

from orchestrator.webhook_addresses import (
    RefusedAddress,
    check_url,
    parse_ipv4,
    parse_networks,
    refused_class,
)

REFUSED = {
    "http://127.0.0.1/": "loopback",
    "http://127.1/": "loopback",
    "http://2130706433/": "loopback",
    "http://0x7f.1/": "loopback",
    "http://0x7f000001/": "loopback",
    "http://0177.0.0.1/": "loopback",
    "http://127.0.0.1.:8080/": "loopback",
    "http://localhost/": "loopback",
    "http://api.localhost/": "loopback",
    "http://[::1]/": "loopback",
    "http://[::ffff:127.0.0.1]/": "loopback",
    "http://[::ffff:7f00:1]/": "loopback",
    "http://10.0.0.1/": "private",
    "http://012.0.0.1/": "private",
    "http://172.16.5.4/": "private",
    "http://192.168.0.1/": "private",
    "http://[fc00::1]/": "private",
    "http://169.254.169.254/latest/meta-data/": "cloud metadata",
    "http://0xa9fea9fe/": "cloud metadata",
    "http://[::ffff:169.254.169.254]/": "cloud metadata",
    "http://[64:ff9b::a9fe:a9fe]/": "cloud metadata",
    "http://[fd00:ec2::254]/": "cloud metadata",
    "http://169.254.1.1/": "link-local",
    "http://[fe80::1]/": "link-local",
    "http://100.64.0.1/": "shared (CGNAT)",
    "http://100.127.255.254/": "shared (CGNAT)",
    "http://224.0.0.1/": "multicast",
    "http://[ff02::1]/": "multicast",
    "http://0.0.0.0/": "unspecified",
    "http://0/": "unspecified",
    "http://[::]/": "unspecified",
    "http://240.0.0.1/": "reserved",
}


@pytest.mark.parametrize(("url", "refused"), REFUSED.items())
def test_every_refused_class_is_refused_in_every_spelling(url: str, refused: str) -> None:
    with pytest.raises(RefusedAddress, match=refused.split(" ")[0]):
        check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/lorafleet",
        "http://93.184.215.14:8080/x",
        "http://[2606:4700::1111]/",
        "http://1.1/",  # 1.0.0.1: a public address, however odd its spelling
        "http://100.128.0.1/",  # just past CGNAT
    ],
)
def test_public_names_and_addresses_are_accepted(url: str) -> None:
    check_url(url)


def test_odd_ipv4_spellings_read_as_inet_aton_does() -> None:
    assert parse_ipv4("127.1") == ipaddress.IPv4Address("127.0.0.1")
    assert parse_ipv4("2130706433") == ipaddress.IPv4Address("127.0.0.1")
    assert parse_ipv4("0x7f.1") == ipaddress.IPv4Address("127.0.0.1")
    assert parse_ipv4("0177.0.0.1") == ipaddress.IPv4Address("127.0.0.1")
    assert parse_ipv4("10.0x10.1") == ipaddress.IPv4Address("10.16.0.1")
    for name in ("example.com", "1.2.3.4.5", "256.1.1.1", "08.1.1.1", "1..1", "1.2.65536"):
        assert parse_ipv4(name) is None


def test_an_allowed_network_lets_its_internal_receivers_in_and_nothing_else() -> None:
    allowed = parse_networks(["10.1.2.0/24", "127.0.0.2/32"])
    assert refused_class(ipaddress.ip_address("10.1.2.9"), allowed) is None
    assert refused_class(ipaddress.ip_address("::ffff:10.1.2.9"), allowed) is None
    assert refused_class(ipaddress.ip_address("10.1.3.9"), allowed) == "private"
    assert refused_class(ipaddress.ip_address("127.0.0.1"), allowed) == "loopback"
    check_url("http://127.0.0.2:9/", allowed)


@pytest.mark.parametrize("url", ["ftp://example.com/", "http:///x", "http://[fe80::1%25eth0]/"])
def test_urls_that_are_not_http_to_a_host_are_refused(url: str) -> None:
    with pytest.raises(RefusedAddress):
        check_url(url)
