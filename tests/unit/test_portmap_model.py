"""hns.model, port mappings: input parsing, host-port overlap, the JSON shapes."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any

import pytest

from hns.errors import InvalidRequest
from hns.model import HostPort, PortMapping, Protocol, parse_host_address, parse_port

HOST = IPv4Address("198.51.100.2")


@pytest.mark.parametrize(("text", "want"), [
    ("tcp", Protocol.TCP), ("TCP", Protocol.TCP), ("udp", Protocol.UDP), (" Udp ", Protocol.UDP),
    ("6", Protocol.TCP), ("17", Protocol.UDP), (17, Protocol.UDP),
])
def test_protocol_parse(text: str | int, want: Protocol) -> None:
    assert Protocol.parse(text) is want


@pytest.mark.parametrize("text", ["sctp", "icmp", "", "tcp;", "1", "tcpudp"])
def test_protocol_parse_refuses_others(text: str) -> None:
    with pytest.raises(InvalidRequest, match="use tcp or udp"):
        Protocol.parse(text)


@pytest.mark.parametrize(("value", "want"), [("1", 1), ("65535", 65535), (80, 80),
                                             ("08080", 8080)])
def test_parse_port(value: int | str, want: int) -> None:
    assert parse_port(value) == want


@pytest.mark.parametrize(("value", "words"), [
    ("0", "between 1 and 65535"), ("65536", "between 1 and 65535"), (0, "between"),
    ("99999", "between"), ("-1", "not a number"), ("x", "not a number"), ("", "not a number"),
    ("8080 ", "not a number"), ("1e3", "not a number"), ("123456", "not a number"),
    (True, "not a number"), (80.0, "not a number"),
])
def test_parse_port_refuses(value: Any, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        parse_port(value, "external port")


def test_parse_host_address() -> None:
    assert parse_host_address(None) is None
    assert parse_host_address("0.0.0.0") is None  # every address, as netsh says it
    assert parse_host_address("198.51.100.2") == HOST


@pytest.mark.parametrize(("text", "words"), [
    ("bogus", "not an IP address"), ("2001:db8::1", "IPv4 only"), ("198.51.100.0/24", "not an"),
    ("127.0.0.1", "not loopback"), ("224.0.0.1", "unicast"), ("255.255.255.255", "unicast"),
])
def test_parse_host_address_refuses(text: str, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        parse_host_address(text)


def test_mapping_parse_validates_every_field() -> None:
    m = PortMapping.parse("wsl", "udp", "5353", 53, "198.51.100.2")
    assert m == PortMapping("wsl", Protocol.UDP, 5353, 53, HOST)
    with pytest.raises(InvalidRequest, match="invalid vm name"):
        PortMapping.parse("bad name!", "tcp", 80, 80)
    with pytest.raises(InvalidRequest, match="invalid internal port"):
        PortMapping.parse("wsl", "tcp", 80, 0)
    with pytest.raises(InvalidRequest, match="invalid external port"):
        PortMapping.parse("wsl", "tcp", "http", 80)


@pytest.mark.parametrize(("a", "b", "overlap"), [
    (HostPort(Protocol.TCP, 80), HostPort(Protocol.TCP, 80), True),
    (HostPort(Protocol.TCP, 80), HostPort(Protocol.TCP, 80, HOST), True),
    (HostPort(Protocol.TCP, 80, HOST), HostPort(Protocol.TCP, 80), True),
    (HostPort(Protocol.TCP, 80, HOST), HostPort(Protocol.TCP, 80, HOST), True),
    (HostPort(Protocol.TCP, 80, HOST), HostPort(Protocol.TCP, 80, IPv4Address("10.0.0.1")),
     False),
    (HostPort(Protocol.TCP, 80), HostPort(Protocol.UDP, 80), False),
    (HostPort(Protocol.TCP, 80), HostPort(Protocol.TCP, 81), False),
])
def test_host_port_overlap(a: HostPort, b: HostPort, overlap: bool) -> None:
    assert a.overlaps(b) is overlap
    assert b.overlaps(a) is overlap


def test_json_shapes() -> None:
    every = PortMapping("wsl", Protocol.TCP, 8080, 80)
    one = PortMapping("wsl", Protocol.UDP, 5353, 53, HOST)
    assert every.to_json() == {"Vm": "wsl", "Protocol": "tcp", "ExternalPort": 8080,
                               "InternalPort": 80, "HostAddress": None}
    assert one.to_json()["HostAddress"] == "198.51.100.2"
    assert every.to_policy() == {"Type": "PortMapping", "Settings": {
        "Protocol": 6, "InternalPort": 80, "ExternalPort": 8080, "VIP": ""}}
    assert one.to_policy()["Settings"] == {"Protocol": 17, "InternalPort": 53,
                                           "ExternalPort": 5353, "VIP": "198.51.100.2"}
    assert every.describe() == "tcp *:8080 -> vm wsl port 80"
    assert one.host_port.describe() == "udp 198.51.100.2:5353"
