"""Port coordination of mirrored networks (pure): claims, host keys, owners, reverse."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv6Address

import pytest

from portproxy.forward_plan import ForwardKey
from portproxy.mirror_plan import Claim, host_keys, plan, vm_claims
from portproxy.tracker import TCP_LISTEN, DiagSocket

PRIMARY = (IPv4Address("198.51.100.2"), IPv6Address("2001:db8:100::2"))


def tcp(address: str, port: int, v6only: bool = False) -> DiagSocket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return DiagSocket("tcp", family, address, port, TCP_LISTEN, v6only=v6only)


def key(port: int, family: int = 4, protocol: str = "tcp") -> ForwardKey:
    return ForwardKey(protocol, family, port)


@pytest.mark.parametrize(("address", "v6only", "expected"), [
    ("0.0.0.0", False, {key(80): Claim("127.0.0.1", True)}),
    ("127.0.0.1", False, {key(80): Claim("127.0.0.1", False)}),
    ("::", True, {key(80, 6): Claim("::1", True)}),
    ("::", False, {key(80, 6): Claim("::1", True), key(80): Claim("127.0.0.1", True)}),
    ("::1", False, {key(80, 6): Claim("::1", False)}),
    ("198.51.100.2", False, {key(80): Claim("198.51.100.2", True)}),
    ("2001:db8:100::2", False, {key(80, 6): Claim("2001:db8:100::2", True)}),
    ("::ffff:198.51.100.2", False, {key(80): Claim("198.51.100.2", True)}),
    ("169.254.0.2", False, {}),          # the transit address: not asked for
    ("127.0.0.2", False, {}),            # only 127.0.0.1 is shared
])
def test_vm_claims_by_bind_address(address: str, v6only: bool,
                                   expected: dict[ForwardKey, Claim]) -> None:
    assert vm_claims([tcp(address, 80, v6only)], PRIMARY) == expected


def test_vm_claims_merge_loopback_and_mirrored_binds() -> None:
    claims = vm_claims([tcp("127.0.0.1", 80), tcp("198.51.100.2", 80)], PRIMARY)
    assert claims == {key(80): Claim("127.0.0.1", True)}


def test_vm_claims_skip_ignored_ports() -> None:
    assert vm_claims([tcp("0.0.0.0", 22), tcp("0.0.0.0", 80)], PRIMARY, ignored=[22]) == {
        key(80): Claim("127.0.0.1", True)}


def test_host_keys_held_and_served_on_loopback() -> None:
    held, local = host_keys([tcp("0.0.0.0", 22), tcp("127.0.0.1", 631),
                             tcp("198.51.100.2", 8000), tcp("::", 53),
                             tcp("169.254.0.1", 53)], PRIMARY)
    assert held == {key(22), key(631), key(8000), key(53, 6), key(53)}
    assert local == {key(22), key(631), key(53, 6), key(53)}


def test_plan_gives_a_key_to_the_first_vm_and_reports_the_rest() -> None:
    claims = {"one": {key(80): Claim("127.0.0.1", True)},
              "two": {key(80): Claim("127.0.0.1", True)}}
    result = plan(claims, {"one": {key(80): 2}, "two": {key(80): 1}}, frozenset(), frozenset())
    assert result.owners == {key(80): ("two", Claim("127.0.0.1", True))}
    assert result.conflicts == {("one", key(80)): "held by vm two"}


def test_plan_leaves_the_hosts_ports_and_port_mappings_alone() -> None:
    claims = {"vm": {key(22): Claim("127.0.0.1", True), key(8080): Claim("127.0.0.1", True),
                     key(81): Claim("127.0.0.1", True)}}
    result = plan(claims, {}, frozenset({key(22)}), frozenset({key(22)}),
                  reserved={("tcp", 8080): "the port mapping of vm web"})
    assert result.owners == {key(81): ("vm", Claim("127.0.0.1", True))}
    assert result.conflicts == {("vm", key(22)): "the host listens on it",
                                ("vm", key(8080)): "held by the port mapping of vm web"}


def test_plan_serves_host_loopback_in_every_vm_but_where_taken_or_ignored() -> None:
    claims = {"a": {}, "b": {key(631): Claim("127.0.0.1", True)}, "c": {}}
    result = plan(claims, {}, frozenset({key(631), key(22)}), frozenset({key(631), key(22)}),
                  ignored={"c": (22,)})
    assert result.reverse == {("a", key(631)), ("a", key(22)), ("b", key(22)), ("c", key(631))}
    assert result.conflicts == {("b", key(631)): "the host listens on it"}


def test_dhcp_client_ports_are_never_claimed() -> None:
    sockets = [DiagSocket("udp", socket.AF_INET, "0.0.0.0", 68, 7),
               DiagSocket("udp", socket.AF_INET6, "::", 546, 7, v6only=True),
               DiagSocket("udp", socket.AF_INET, "0.0.0.0", 69, 7)]
    assert vm_claims(sockets, PRIMARY) == {key(69, protocol="udp"): Claim("127.0.0.1", True)}
