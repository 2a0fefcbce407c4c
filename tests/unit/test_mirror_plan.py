"""Port coordination of mirrored networks (pure): claims, host keys, owners, reverse."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hns.daemon.forward_plan import ForwardKey, cap_reason, ephemeral_cap
from hns.daemon.mirror_plan import Claim, MirrorPlan, draining, host_keys, plan, vm_claims
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


# a key kept while a connection the VM accepted on it lives

LOOP = Claim("127.0.0.1", True)


def test_draining_keeps_the_owned_tcp_keys_with_connections() -> None:
    owners = {key(80): ("a", LOOP), key(80, 6): ("a", Claim("::1", True)),
              key(81): ("a", LOOP), key(82): ("b", LOOP),
              key(53, protocol="udp"): ("a", LOOP), key(83): ("a", LOOP)}
    claims = {"a": {key(83): LOOP}, "b": {}}
    kept = draining(owners, claims, {"a": [80, 53, 83], "b": [82]})
    # port 81: no connection; udp 53: not TCP; 83: still listened on; b's 82: b has it
    assert kept == {"a": {key(80): LOOP, key(80, 6): Claim("::1", True)},
                    "b": {key(82): LOOP}}
    assert draining(owners, {"b": {}}, {"a": [80]}) == {}     # a is not watched any more


def test_a_draining_key_stays_its_owners_and_a_new_claim_is_a_conflict() -> None:
    claims: dict[str, dict[ForwardKey, Claim]] = {"a": {}, "b": {key(80): LOOP}}
    order = {"a": {key(80): 1}, "b": {key(80): 2}}
    result = plan(claims, order, frozenset(), frozenset(), drain={"a": {key(80): LOOP}})
    assert result.owners == {key(80): ("a", LOOP)}
    assert result.draining == {("a", key(80))}
    assert result.conflicts == {("b", key(80)): "held by vm a"}
    # once the connection is gone the key goes to the next claim
    after = plan(claims, {"b": {key(80): 2}}, frozenset(), frozenset())
    assert after == MirrorPlan({key(80): ("b", LOOP)}, {}, frozenset(), frozenset())


def test_a_draining_key_the_host_holds_is_dropped_without_a_conflict() -> None:
    result = plan({"a": {}}, {"a": {key(80): 1}}, frozenset({key(80)}), frozenset({key(80)}),
                  reserved={("tcp", 81): "the port mapping of vm web"},
                  drain={"a": {key(80): LOOP, key(81): LOOP}})
    assert result.owners == {} and result.conflicts == {} and result.draining == frozenset()
    assert result.reverse == frozenset()     # nor served into the VM while it drains


def test_a_listened_key_is_not_draining() -> None:
    claims = {"a": {key(80): LOOP}}
    result = plan(claims, {"a": {key(80): 1}}, frozenset(), frozenset(),
                  drain={"a": {key(80): Claim("198.51.100.2", True)}})
    assert result.owners == {key(80): ("a", LOOP)}    # the claim, not the old one
    assert result.draining == frozenset()


# the ephemeral cap on the host loopback listeners

RANGE = (40000, 40009)


def test_the_cap_applies_to_the_owned_keys() -> None:
    claims = {"a": {key(p): LOOP for p in range(40000, 40010)} | {key(8080): LOOP},
              "b": {key(40000, 6): LOOP}}
    order = {"a": {key(p): p - 39999 for p in range(40000, 40010)}, "b": {key(40000, 6): 50}}
    result = plan(claims, order, frozenset(), frozenset(), ephemeral=RANGE)
    assert {k.port for k in result.owners} == {40000, 40001, 40002, 40003, 40004, 8080}
    assert result.owners[key(40000, 6)] == ("b", LOOP)   # a held port: counted once
    assert result.conflicts == {("a", key(p)): cap_reason(RANGE) for p in range(40005, 40010)}


def test_draining_keys_count_against_the_cap() -> None:
    claims = {"a": {}, "b": {key(40001): LOOP}}
    order = {"a": {key(40000): 1}, "b": {key(40001): 2}}
    result = plan(claims, order, frozenset(), frozenset(), drain={"a": {key(40000): LOOP}},
                  ephemeral=(40000, 40002))
    assert result.owners == {key(40000): ("a", LOOP)}
    assert result.conflicts == {("b", key(40001)): cap_reason((40000, 40002))}


_keys = st.builds(ForwardKey, st.sampled_from(["tcp", "udp"]), st.sampled_from([4, 6]),
                  st.integers(39995, 40025))


@given(st.dictionaries(st.sampled_from(["a", "b", "c"]),
                       st.dictionaries(_keys, st.integers(1, 40), max_size=20), max_size=3),
       st.integers(0, 12))
def test_mirrored_cap_holds_for_any_claims(order: dict[str, dict[ForwardKey, int]],
                                           width: int) -> None:
    ephemeral = (40000, 40000 + width)
    claims = {vm: dict.fromkeys(keys, LOOP) for vm, keys in order.items()}
    capped = plan(claims, order, frozenset(), frozenset(), ephemeral=ephemeral)
    free = plan(claims, order, frozenset(), frozenset())
    for protocol in ("tcp", "udp"):
        held = {k.port for k in capped.owners
                if k.protocol == protocol and 40000 <= k.port <= 40000 + width}
        assert len(held) <= ephemeral_cap(ephemeral)
    assert capped.owners.items() <= free.owners.items()
    assert all(k in capped.owners for k in free.owners
               if not 40000 <= k.port <= 40000 + width)
    for k in free.owners.keys() - capped.owners.keys():
        assert all(capped.conflicts[(vm, k)] == cap_reason(ephemeral)
                   for vm in claims if k in claims[vm])
