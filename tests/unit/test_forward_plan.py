"""hns.daemon.forward_plan: which host loopback ports serve which VM.  Pure, no root."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hns.daemon.forward_plan import (
    Claims,
    ForwardKey,
    Plan,
    cap_reason,
    changes,
    ephemeral_cap,
    keys_of,
    plan,
    reserved_by,
    wanted_keys,
)
from hns.daemon.netsh import PortProxy, parse_add
from portproxy.tracker import TCP_CLOSE, TCP_LISTEN, DiagSocket


def tcp(address: str, port: int = 8080, v6only: bool = False) -> DiagSocket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return DiagSocket("tcp", family, address, port, TCP_LISTEN, 0, v6only)


def key(family: int, port: int = 8080, protocol: str = "tcp") -> ForwardKey:
    return ForwardKey(protocol, family, port)


@pytest.mark.parametrize(("sock", "families"), [
    (tcp("0.0.0.0"), {4}),
    (tcp("127.0.0.1"), {4}),
    (tcp("::"), {4, 6}),                       # dual stack: host 127.0.0.1 too (WSL 4851)
    (tcp("::", v6only=True), {6}),
    (tcp("::1"), {6}),
    (tcp("::1", v6only=True), {6}),
    (tcp("::ffff:127.0.0.1"), {4}),
    (tcp("::ffff:0.0.0.0"), {4}),
    (tcp("172.16.0.2"), set()),                # the VM's own address: not loopback
    (tcp("127.0.0.2"), set()),
    (tcp("2001:db8::2"), set()),
    (tcp("fe80::1%eth0"), set()),
    (tcp("not-an-address"), set()),
], ids=lambda v: v.address if isinstance(v, DiagSocket) else None)
def test_keys_of_a_socket(sock: DiagSocket, families: set[int]) -> None:
    assert keys_of(sock) == {key(f) for f in families}


def test_udp_sockets_ask_for_udp_ports() -> None:
    sock = DiagSocket("udp", socket.AF_INET, "0.0.0.0", 53, TCP_CLOSE)
    assert keys_of(sock) == {ForwardKey("udp", 4, 53)}


def test_wanted_keys_of_a_vm_merge_its_sockets() -> None:
    sockets = [tcp("0.0.0.0"), tcp("::", v6only=True), tcp("::1", port=9000), tcp("10.0.0.2")]
    assert wanted_keys(sockets) == {key(4), key(6), key(6, 9000)}


def test_endpoints_and_loopback_of_each_family() -> None:
    assert key(4).endpoint() == "127.0.0.1:8080"
    assert key(6).endpoint() == "[::1]:8080"
    assert (key(4).socket_family, key(6).socket_family) == (socket.AF_INET, socket.AF_INET6)


# who gets a host port


def test_first_claim_wins_and_the_other_is_a_conflict() -> None:
    claims = Claims()
    claims.update("b", {key(4)})
    claims.update("a", {key(4), key(6)})
    result = plan(claims.snapshot())
    assert result.owners == {key(4): "b", key(6): "a"}
    assert result.conflicts == {("a", key(4)): "held by vm b"}


def test_the_holder_keeps_a_port_while_it_wants_it() -> None:
    claims = Claims()
    claims.update("b", {key(4)})
    claims.update("a", {key(4)})
    claims.update("b", {key(4), key(4, 9000)})         # b changes, keeps its old claim
    assert plan(claims.snapshot()).owners[key(4)] == "b"


def test_the_oldest_remaining_claim_takes_over() -> None:
    claims = Claims()
    for vm in ("a", "b", "c"):
        claims.update(vm, {key(4)})
    claims.update("a", set())
    assert plan(claims.snapshot()).owners == {key(4): "b"}
    claims.remove("b")
    assert plan(claims.snapshot()) == Plan({key(4): "c"}, {})
    assert claims.of("a") == frozenset()


def test_a_claim_given_up_and_made_again_goes_to_the_back() -> None:
    claims = Claims()
    claims.update("a", {key(4)})
    claims.update("b", {key(4)})
    claims.update("a", set())
    claims.update("a", {key(4)})
    assert plan(claims.snapshot()).owners == {key(4): "b"}


def test_equal_claims_go_to_the_first_name() -> None:
    result = plan({"b": {key(4): 1}, "a": {key(4): 1}})
    assert result.owners == {key(4): "a"}
    assert result.conflicts == {("b", key(4)): "held by vm a"}


def test_changes_stop_and_start_what_differs() -> None:
    current = {key(4): "a", key(6): "a", key(4, 9000): "b"}
    desired = {key(4): "a", key(6): "b", key(4, 7000): "c"}
    stop, start = changes(current, desired)
    assert stop == sorted([key(6), key(4, 9000)])
    assert start == sorted([key(6), key(4, 7000)])
    assert changes(desired, desired) == ([], [])


# static port proxies come first


def proxy(words: str, kind: str = "v4tov4") -> PortProxy:
    return parse_add(kind, words.split())


def test_static_proxies_on_every_address_or_loopback_reserve_their_port() -> None:
    reserved = reserved_by([
        proxy("listenport=8080 connectaddress=10.0.0.2"),                       # 0.0.0.0
        proxy("listenport=9000 listenaddress=127.0.0.1 connectaddress=10.0.0.2 "
              "protocol=udp"),
        proxy("listenport=7000 connectaddress=10.0.0.2", "v6tov4"),             # ::
        proxy("listenport=6000 listenaddress=198.51.100.2 connectaddress=10.0.0.2"),
        proxy("listenport=5000 listenaddress=127.0.0.2 connectaddress=10.0.0.2"),
    ])
    assert set(reserved) == {key(4, 8080), ForwardKey("udp", 4, 9000), key(6, 7000)}
    assert reserved[key(4, 8080)] == "portproxy v4tov4 tcp 0.0.0.0:8080"


def test_a_reserved_port_is_nobodys_and_every_claim_is_told_why() -> None:
    claims = Claims()
    claims.update("a", {key(4), key(6)})
    claims.update("b", {key(4)})
    result = plan(claims.snapshot(), {key(4): "portproxy v4tov4 tcp 0.0.0.0:8080"})
    assert result.owners == {key(6): "a"}
    assert result.conflicts == {
        ("a", key(4)): "reserved by portproxy v4tov4 tcp 0.0.0.0:8080",
        ("b", key(4)): "reserved by portproxy v4tov4 tcp 0.0.0.0:8080"}


# the ephemeral cap: at most half of the host's ephemeral range is held, per protocol

RANGE = (40000, 40009)                                   # 10 ports: 5 may be held
CAPPED = "over the ephemeral cap (half of the host's 40000-40009)"


def test_the_cap_is_half_the_range_rounded_down() -> None:
    assert ephemeral_cap(RANGE) == 5
    assert ephemeral_cap((32768, 60999)) == 14116
    assert ephemeral_cap((40000, 40000)) == 0
    assert cap_reason(RANGE) == CAPPED


def test_over_the_cap_the_oldest_claims_keep_their_ports() -> None:
    claims = Claims()
    for port in (40009, 40001, 40007, 40002, 40000, 40003, 40004, 40005, 40006, 40008):
        claims.update(f"vm{port}", {key(4, port)})      # claimed in this order
    result = plan(claims.snapshot(), ephemeral=RANGE)
    assert sorted(k.port for k in result.owners) == [40000, 40001, 40002, 40007, 40009]
    assert result.conflicts == {(f"vm{p}", key(4, p)): CAPPED
                                for p in (40003, 40004, 40005, 40006, 40008)}


def test_the_cap_counts_a_port_once_for_both_families_and_each_protocol_apart() -> None:
    claims = {"a": {key(4, 40000 + i): i + 1 for i in range(5)}}
    claims["a"].update({key(6, 40000 + i): 10 + i for i in range(5)})     # the same ports
    claims["b"] = {key(4, 40005, "udp"): 20, key(6, 40006): 21}
    result = plan(claims, ephemeral=RANGE)
    assert set(result.owners) == set(claims["a"]) | {key(4, 40005, "udp")}
    assert result.conflicts == {("b", key(6, 40006)): CAPPED}


def test_ports_outside_the_range_are_not_counted_nor_capped() -> None:
    claims = {"a": {key(4, port): port for port in [*range(40000, 40010), 8080, 39999, 40010]}}
    result = plan(claims, ephemeral=RANGE)
    assert {k.port for k in result.owners} == {40000, 40001, 40002, 40003, 40004, 8080,
                                               39999, 40010}
    assert plan(claims).conflicts == {}                 # without a range: no cap


def test_capped_ports_give_every_claim_the_reason_and_reserved_ones_are_not_counted() -> None:
    claims = {"a": {key(4, 40000): 1, key(4, 40001): 2},
              "b": {key(4, 40001): 3, key(4, 40002): 4}}
    result = plan(claims, {key(4, 40000): "portproxy p"}, ephemeral=(40000, 40002))
    assert result.owners == {key(4, 40001): "a"}
    assert result.conflicts == {
        ("a", key(4, 40000)): "reserved by portproxy p",
        ("b", key(4, 40001)): "held by vm a",
        ("b", key(4, 40002)): "over the ephemeral cap (half of the host's 40000-40002)"}


def test_when_an_old_claim_goes_a_capped_one_is_held() -> None:
    claims = Claims()
    for port in range(40000, 40007):
        claims.update(f"vm{port}", {key(4, port)})
    assert key(4, 40005) not in plan(claims.snapshot(), ephemeral=RANGE).owners
    claims.remove("vm40002")
    assert plan(claims.snapshot(), ephemeral=RANGE).owners[key(4, 40005)] == "vm40005"


_keys = st.builds(ForwardKey, st.sampled_from(["tcp", "udp"]), st.sampled_from([4, 6]),
                  st.integers(39990, 40030))
_claims = st.dictionaries(st.sampled_from(["a", "b", "c", "d"]),
                          st.dictionaries(_keys, st.integers(1, 60), max_size=25),
                          max_size=4)
_ranges = st.tuples(st.integers(39995, 40015), st.integers(0, 20)).map(
    lambda t: (t[0], t[0] + t[1]))


@given(_claims, _ranges)
def test_the_cap_holds_for_any_claims(claims: dict[str, dict[ForwardKey, int]],
                                      ephemeral: tuple[int, int]) -> None:
    low, high = ephemeral
    capped, free = plan(claims, ephemeral=ephemeral), plan(claims)

    def inside(k: ForwardKey) -> bool:
        return low <= k.port <= high

    for protocol in ("tcp", "udp"):
        ports = {k.port for k in capped.owners if k.protocol == protocol and inside(k)}
        assert len(ports) <= ephemeral_cap(ephemeral)
    # the cap only takes keys away, and never one outside the range
    assert capped.owners.items() <= free.owners.items()
    assert {k: v for k, v in free.owners.items() if not inside(k)}.items() \
        <= capped.owners.items()
    # oldest win: a capped port's best claim is not older than any held port's
    rank = {k: min((s, vm) for vm, ks in claims.items() for kk, s in ks.items() if kk == k)
            for k in free.owners}
    for k in free.owners.keys() - capped.owners.keys():
        assert capped.conflicts[(free.owners[k], k)] == cap_reason(ephemeral)
        held = [kk for kk in capped.owners if kk.protocol == k.protocol and inside(kk)]
        assert len({kk.port for kk in held}) == ephemeral_cap(ephemeral)
        ports = {kk.port for kk in held}
        assert k.port not in ports
        for port in ports:
            assert min(rank[kk] for kk in held if kk.port == port) <= rank[k]   # ties: key
