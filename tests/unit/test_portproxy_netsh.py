"""netsh portproxy words, the proxy configuration in the store (no root, no kernel)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from hns.errors import AlreadyExists, Conflict, InvalidRequest
from hns.store import Store
from portproxy.config import ProxyConfig
from portproxy.netsh import PortProxy, ProxyKey, conflicts, parse_add, parse_delete


def test_defaults_are_netsh_s() -> None:
    p = parse_add("v4tov4", ["listenport=8080", "connectaddress=172.16.0.2"])
    assert p == PortProxy("v4tov4", "tcp", IPv4Address("0.0.0.0"), 8080,
                          IPv4Address("172.16.0.2"), 8080)
    v6 = parse_add("V6toV6", ["ListenPort=53", "protocol=UDP"])
    assert v6.listen_address == IPv6Address("::") and v6.connect_address == IPv6Address("::1")
    assert v6.protocol == "udp" and v6.connect_port == 53 and v6.kind == "v6tov6"


def test_every_word_in_any_order() -> None:
    p = parse_add("v6tov4", ["connectport=80", "connectaddress=10.0.0.5", "protocol=tcp",
                             "listenaddress=[2001:db8::1]", "listenport=8080"])
    assert p.listen_address == IPv6Address("2001:db8::1") and p.listen_port == 8080
    assert p.connect_address == IPv4Address("10.0.0.5") and p.connect_port == 80
    assert p.name == "portproxy v6tov4 tcp [2001:db8::1]:8080"
    assert p.to_json() == {"Type": "v6tov4", "Protocol": "tcp", "ListenAddress": "2001:db8::1",
                           "ListenPort": 8080, "ConnectAddress": "10.0.0.5",
                           "ConnectPort": 80}


@pytest.mark.parametrize("kind, words", [
    ("v4tov5", ["listenport=1"]),
    ("v4tov4", []),
    ("v4tov4", ["connectaddress=10.0.0.1"]),
    ("v4tov4", ["listenport=0"]),
    ("v4tov4", ["listenport=65536"]),
    ("v4tov4", ["listenport=http"]),
    ("v4tov4", ["listenport=-1"]),
    ("v4tov4", ["listenport=80", "connectport=99999"]),
    ("v4tov4", ["listenport=80", "listenaddress=::1"]),
    ("v4tov6", ["listenport=80", "connectaddress=10.0.0.1"]),
    ("v4tov4", ["listenport=80", "connectaddress=example.com"]),
    ("v4tov4", ["listenport=80", "connectaddress=0.0.0.0"]),
    ("v4tov4", ["listenport=80", "connectaddress=224.0.0.1"]),
    ("v4tov4", ["listenport=80", "protocol=sctp"]),
    ("v4tov4", ["listenport=80", "listenport=81"]),
    ("v4tov4", ["listenport=80", "color=blue"]),
    ("v4tov4", ["listenport"]),
    ("v4tov4", ["listenport="]),
])
def test_bad_words_are_refused(kind: str, words: list[str]) -> None:
    with pytest.raises(InvalidRequest):
        parse_add(kind, words)


def test_delete_words() -> None:
    kind, key = parse_delete("v4tov4", ["listenport=8080"])
    assert (kind, key) == ("v4tov4", ProxyKey("tcp", "0.0.0.0", 8080))
    _, key = parse_delete("v6tov6", ["listenport=53", "listenaddress=::1", "protocol=udp"])
    assert key == ProxyKey("udp", "::1", 53)
    with pytest.raises(InvalidRequest):
        parse_delete("v4tov4", ["listenport=1", "connectport=2"])


def test_conflicts_follow_bind_rules() -> None:
    wild = parse_add("v4tov4", ["listenport=80", "connectaddress=10.0.0.1"])
    one = parse_add("v4tov4", ["listenport=80", "listenaddress=10.9.0.1",
                               "connectaddress=10.0.0.1"])
    other = parse_add("v4tov4", ["listenport=80", "listenaddress=10.9.0.2",
                                 "connectaddress=10.0.0.1"])
    udp = parse_add("v4tov4", ["listenport=80", "protocol=udp", "connectaddress=10.0.0.1"])
    v6 = parse_add("v6tov4", ["listenport=80", "connectaddress=10.0.0.1"])
    assert conflicts(one, [wild]) == wild and conflicts(wild, [one]) == one
    assert conflicts(other, [one]) is None
    assert conflicts(udp, [wild]) is None and conflicts(v6, [wild, udp]) is None


@pytest.fixture
def config(tmp_path: Path) -> ProxyConfig:
    return ProxyConfig(Store(tmp_path))


def test_config_add_list_delete_reset(config: ProxyConfig) -> None:
    a = parse_add("v4tov4", ["listenport=80", "connectaddress=10.0.0.1"])
    b = parse_add("v6tov4", ["listenport=53", "protocol=udp", "connectaddress=10.0.0.1"])
    config.add(a)
    config.add(b)
    assert config.list() == [a, b]
    with pytest.raises(AlreadyExists):
        config.add(a)
    with pytest.raises(Conflict):
        config.add(parse_add("v4tov4", ["listenport=80", "listenaddress=10.1.1.1"]))
    changed = parse_add("v4tov4", ["listenport=80", "connectaddress=10.0.0.2"])
    config.add(changed, replace=True)
    assert config.list() == [changed, b]
    assert not config.delete("v4tov6", a.key)  # the type must match, as in netsh
    assert config.delete("v4tov4", a.key) and not config.delete("v4tov4", a.key)
    assert config.reset() == 1 and config.list() == []


def test_data_version_moves_when_another_connection_commits(tmp_path: Path) -> None:
    reader = ProxyConfig(Store(tmp_path))
    writer = ProxyConfig(Store(tmp_path))
    before = reader.data_version()
    writer.add(parse_add("v4tov4", ["listenport=80"]))
    assert reader.data_version() != before
    assert len(reader.list()) == 1
