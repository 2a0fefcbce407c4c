"""Property-based tests of every parser of user input (hypothesis): what we did not think of.

Three properties hold for each parser: it raises nothing but :class:`InvalidRequest` on any
text; what it accepts round-trips (the printed form parses back to the same value); and
numbers are ASCII digits only (``int()`` and ``str.isdigit()`` also take other scripts'
digits and '²').
No wall-clock limits (``deadline=None``) and no example database in the working tree.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hns.daemon.netsh import KINDS, PortProxy, parse_add, parse_delete
from hns.errors import InvalidRequest
from hns.model import (
    NAME_RE,
    PRIVATE_RANGES,
    HostPort,
    NetworkType,
    PortMapping,
    Protocol,
    format_port_list,
    parse_host_address,
    parse_ipv4,
    parse_mac,
    parse_mtu,
    parse_name,
    parse_netns_name,
    parse_on_off,
    parse_port,
    parse_port_list,
    parse_subnet,
)

T = TypeVar("T")

settings.register_profile("hns", deadline=None, database=None, max_examples=200,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("hns")

ASCII_DIGITS = frozenset("0123456789")
# Digits of other scripts (Arabic-Indic, Devanagari, fullwidth, ...) and the superscripts
# and other characters str.isdigit() says yes to.
FOREIGN_DIGITS = st.characters(categories=["Nd", "No"]).filter(lambda c: c not in ASCII_DIGITS)
# Text that looks like input: ASCII punctuation and digits with a share of anything else.
NASTY = st.one_of(
    st.text(),
    st.text(alphabet=st.sampled_from("0123456789abcdefABCDEF:.-/%[], \t\n_x+")),
    st.text(alphabet=st.one_of(st.sampled_from("0123456789.:/-"), FOREIGN_DIGITS)),
)


def outcome(parse: Callable[[str], T], text: str) -> T | None:
    """``parse(text)``, or None when it refused it as InvalidRequest (anything else fails)."""
    try:
        return parse(text)
    except InvalidRequest as exc:
        assert "\n" not in str(exc), "an error message is one line"
        return None


def with_foreign_digit(text: str, digit: str) -> str:
    """``text`` with its first ASCII digit replaced by ``digit``."""
    return re.sub(r"[0-9]", digit, text, count=1)


# names


@given(NASTY)
def test_name_is_refused_or_returned_unchanged(text: str) -> None:
    name = outcome(parse_name, text)
    if name is not None:
        assert name == text and text.isascii() and NAME_RE.fullmatch(text)


@given(st.from_regex(NAME_RE, fullmatch=True))
def test_every_name_of_the_grammar_is_accepted(text: str) -> None:
    assert parse_name(text) == text


@given(NASTY)
def test_netns_name_is_never_a_path(text: str) -> None:
    name = outcome(parse_netns_name, text)
    if name is not None:
        assert name == text and "/" not in name and name not in ("", ".", "..")
        assert name.isascii() and "\x00" not in name


# addresses and subnets


@given(NASTY)
@example("\u0661\u0660.0.0.1")
@example("10.0.0.1%eth0")
def test_ipv4_is_refused_or_round_trips(text: str) -> None:
    addr = outcome(parse_ipv4, text)
    if addr is not None:
        assert isinstance(addr, IPv4Address) and parse_ipv4(str(addr)) == addr
        assert text.isascii()


@given(st.ip_addresses(v=4))
def test_every_ipv4_address_is_accepted(addr: IPv4Address) -> None:
    assert parse_ipv4(str(addr)) == addr


@given(st.ip_addresses(v=6))
def test_ipv6_is_refused_as_a_nat_address(addr: IPv6Address) -> None:
    assert outcome(parse_ipv4, str(addr)) is None


@st.composite
def private_subnets(draw: st.DrawFn) -> IPv4Network:
    base = draw(st.sampled_from(PRIVATE_RANGES))
    prefix = draw(st.integers(base.prefixlen, 30))
    index = draw(st.integers(0, 2 ** (prefix - base.prefixlen) - 1))
    return IPv4Network((int(base.network_address) + index * 2 ** (32 - prefix), prefix))


@given(NASTY)
@example("10.0.0.0/\u0668")
@example("10.0.0.0/255.255.0.0")
def test_subnet_is_refused_or_private_and_round_trips(text: str) -> None:
    net = outcome(parse_subnet, text)
    if net is not None:
        assert net.prefixlen <= 30 and any(net.subnet_of(r) for r in PRIVATE_RANGES)
        assert parse_subnet(str(net)) == net
        assert text.isascii()


@given(private_subnets())
def test_every_private_subnet_is_accepted(net: IPv4Network) -> None:
    assert parse_subnet(str(net)) == net


@given(private_subnets(), st.integers(1, 255))
def test_a_subnet_with_host_bits_is_refused(net: IPv4Network, offset: int) -> None:
    host = IPv4Address(int(net.network_address) + offset % net.num_addresses)
    if host != net.network_address:
        assert outcome(parse_subnet, f"{host}/{net.prefixlen}") is None


@given(NASTY)
def test_host_address_is_refused_or_a_unicast_ipv4(text: str) -> None:
    try:
        addr = parse_host_address(text)
    except InvalidRequest:
        return
    if addr is not None:
        assert not (addr.is_loopback or addr.is_multicast or addr.is_unspecified)
        assert parse_host_address(str(addr)) == addr


# numbers


@given(NASTY)
@example("\u0668\u0660")
@example("²")
@example("8080 ")
@example("+80")
@example("0x50")
@example("8_0")
def test_port_is_accepted_exactly_as_ascii_digits_in_range(text: str) -> None:
    port = outcome(parse_port, text)
    expected = (int(text) if re.fullmatch(r"[0-9]{1,5}", text) and 1 <= int(text) <= 65535
                else None)
    assert port == expected


@given(st.integers(1, 65535), FOREIGN_DIGITS)
def test_a_foreign_digit_makes_any_number_invalid(value: int, digit: str) -> None:
    text = with_foreign_digit(str(value), digit)
    assert outcome(parse_port, text) is None
    assert outcome(parse_mtu, with_foreign_digit(str(value % 64960 + 576), digit)) is None
    assert outcome(parse_port_list, f"22,{text}") is None


@given(st.integers())
def test_port_as_an_int(value: int) -> None:
    assert outcome(lambda v: parse_port(int(v)), str(value)) == (
        value if 1 <= value <= 65535 else None)


@given(NASTY)
@example("\u0661\u0665\u0660\u0660")
@example(" 1500")
@example("1500\n")
@example("9" * 5000)
def test_mtu_is_accepted_exactly_as_ascii_digits_in_range(text: str) -> None:
    mtu = outcome(parse_mtu, text)
    small = re.fullmatch(r"[0-9]+", text) and len(text.lstrip("0")) <= 6
    expected = int(text) if small and 576 <= int(text) <= 65535 else None
    assert mtu == expected


@given(st.integers(-(10 ** 30), 10 ** 30))
def test_mtu_range(value: int) -> None:
    assert outcome(lambda t: parse_mtu(int(t)), str(value)) == (
        value if 576 <= value <= 65535 else None)
    if value >= 0:
        assert outcome(parse_mtu, str(value)) == (value if 576 <= value <= 65535 else None)


@given(NASTY)
@example("22,")
@example("10-5")
@example("1-65535")
@example("22,\u0668\u0660")
def test_port_list_is_refused_or_sorted_distinct_and_round_trips(text: str) -> None:
    ports = outcome(parse_port_list, text)
    if ports is not None:
        assert list(ports) == sorted(set(ports)) and len(ports) <= 4096
        assert all(1 <= p <= 65535 for p in ports)
        assert parse_port_list(format_port_list(ports)) == ports
        assert set(re.findall(r"\d", text)) <= ASCII_DIGITS


@given(st.sets(st.integers(1, 65535), max_size=300))
def test_every_port_set_round_trips(ports: set[int]) -> None:
    as_tuple = tuple(sorted(ports))
    assert parse_port_list(format_port_list(as_tuple)) == as_tuple
    assert parse_port_list(" , ".join(str(p) for p in ports) or None) == as_tuple


# MACs, switches, protocols, types


@given(NASTY)
@example("00:15:5d:00:00:01")
@example("00-15-5D-00-00-01")
@example("00:15-5d:00:00:01")
def test_mac_is_refused_or_unicast_lower_colons_and_round_trips(text: str) -> None:
    mac = outcome(parse_mac, text)
    if mac is not None:
        assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac)
        assert not int(mac[:2], 16) & 1 and mac != "00:00:00:00:00:00"
        assert parse_mac(mac) == mac and text.isascii()


@given(st.binary(min_size=6, max_size=6), st.sampled_from([":", "-"]), st.booleans())
def test_every_unicast_mac_is_accepted(raw: bytes, sep: str, upper: bool) -> None:
    raw = bytes([raw[0] & 0xFE]) + raw[1:]
    text = sep.join(f"{b:02x}" for b in raw)
    expected = None if raw == bytes(6) else text.replace("-", ":")
    assert outcome(parse_mac, text.upper() if upper else text) == expected


ON = {"on", "true", "yes", "1"}
OFF = {"off", "false", "no", "0"}


@given(st.one_of(NASTY, st.sampled_from(sorted(ON | OFF)).map(str.upper)))
@example("\u0661")
@example("\u3000on")
def test_on_off_accepts_exactly_its_words(text: str) -> None:
    word = text.strip().lower()
    expected = (True if word in ON else False if word in OFF else None) if text.isascii() \
        else None
    assert outcome(parse_on_off, text) == expected


@given(NASTY)
@example("\u0666")
def test_protocol_is_tcp_or_udp(text: str) -> None:
    proto = outcome(Protocol.parse, text)
    if proto is not None:
        assert Protocol.parse(proto.keyword) is proto is Protocol.parse(str(proto.value))


@given(NASTY)
def test_network_type_round_trips(text: str) -> None:
    kind = outcome(NetworkType.parse, text)
    if kind is not None:
        assert NetworkType.parse(kind.value) is kind


@given(NASTY, NASTY, NASTY, st.one_of(st.none(), NASTY))
def test_port_mapping_is_refused_or_round_trips(proto: str, ext: str, internal: str,
                                                host: str | None) -> None:
    try:
        m = PortMapping.parse("vm", proto, ext, internal, host)
    except InvalidRequest:
        return
    again = PortMapping.parse(m.vm, m.protocol.keyword, str(m.external_port),
                              str(m.internal_port), str(m.host_address or "0.0.0.0"))
    assert again == m
    assert HostPort.parse(m.protocol, m.external_port, m.host_address) == m.host_port


@given(st.sampled_from(["tcp", "udp", "6", "17"]), st.integers(1, 65535),
       st.integers(1, 65535))
def test_every_valid_mapping_is_accepted(proto: str, ext: int, internal: int) -> None:
    m = PortMapping.parse("vm", proto, str(ext), str(internal))
    assert (m.external_port, m.internal_port, m.host_address) == (ext, internal, None)


# netsh words

KEYS = ["listenport", "listenaddress", "connectaddress", "connectport", "protocol"]
VALUES = st.one_of(
    NASTY,
    st.integers(-5, 70000).map(str),
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.sampled_from(["tcp", "udp", "TCP", "sctp", "\u0668\u0660", "²", "0", "65536", "::",
                     "0.0.0.0"]),
)
WORD = st.one_of(
    st.tuples(st.sampled_from(KEYS).map(lambda k: k.upper() if len(k) % 2 else k),
              VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
    NASTY,
)
KIND = st.one_of(st.sampled_from([*KINDS, "V4TOV6", "v4tov5", ""]), NASTY)


def netsh_words(p: PortProxy) -> list[str]:
    return [f"listenport={p.listen_port}", f"listenaddress={p.listen_address}",
            f"connectaddress={p.connect_address}", f"connectport={p.connect_port}",
            f"protocol={p.protocol}"]


@given(KIND, st.lists(WORD, max_size=6))
@example("v4tov4", ["listenport=²"])
@example("v4tov4", ["listenport=\u0668\u0660"])
@example("v6tov6", ["listenport=80", "listenaddress=fe80::1%\n"])
def test_netsh_add_is_refused_or_round_trips(kind: str, words: list[str]) -> None:
    proxy = outcome(lambda k: parse_add(k, words), kind)
    if proxy is None:
        return
    assert proxy.kind in KINDS and proxy.protocol in ("tcp", "udp")
    assert 1 <= proxy.listen_port <= 65535 and 1 <= proxy.connect_port <= 65535
    assert parse_add(proxy.kind, netsh_words(proxy)) == proxy
    assert parse_delete(proxy.kind, [*netsh_words(proxy)[:2], f"protocol={proxy.protocol}"]) \
        == (proxy.kind, proxy.key)
    assert str(proxy.listen_address).isprintable() and str(proxy.connect_address).isprintable()
    port_words = [w.partition("=")[2] for w in words
                  if w.partition("=")[0].strip().lower() in ("listenport", "connectport")]
    assert all(re.fullmatch(r"\s*[0-9]+\s*", v) for v in port_words)


@given(KIND, st.lists(WORD, max_size=4))
def test_netsh_delete_is_refused_or_a_key(kind: str, words: list[str]) -> None:
    found = outcome(lambda k: parse_delete(k, words), kind)
    if found is not None:
        kind_out, key = found
        assert kind_out in KINDS and 1 <= key.listen_port <= 65535
        assert key.protocol in ("tcp", "udp")


@given(st.sampled_from(KINDS), st.integers(1, 65535), FOREIGN_DIGITS)
def test_netsh_ports_are_ascii_digits_only(kind: str, port: int, digit: str) -> None:
    bad = with_foreign_digit(str(port), digit)
    for words in ([f"listenport={bad}"], [f"listenport={port}", f"connectport={bad}"]):
        assert outcome(lambda k, w=words: parse_add(k, w), kind) is None  # type: ignore[misc]
    assert outcome(lambda k: parse_delete(k, [f"listenport={bad}"]), kind) is None
    assert parse_add(kind, [f"listenport={port}"]).listen_port == port


@pytest.mark.parametrize("parse", [parse_name, parse_netns_name, parse_ipv4, parse_subnet,
                                   parse_mac, parse_mtu, parse_port, parse_port_list,
                                   parse_on_off, Protocol.parse, NetworkType.parse])
@given(text=st.text(min_size=1000, max_size=5000))
def test_long_input_is_refused_cleanly(parse: Callable[[str], Any], text: str) -> None:
    outcome(parse, text)
