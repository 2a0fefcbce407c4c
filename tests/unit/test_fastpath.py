"""The kernel data path's pure parts: the fast table, which sockets the kernel can
forward, which proxies it can serve, and the daemon's bookkeeping of elements and
``route_localnet`` (against the in-memory nft)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address
from types import SimpleNamespace
from typing import Any

import pytest

from hns.daemon.fastpath import FastPath
from hns.daemon.forward_plan import ForwardKey, kernel_keys
from hns.daemon.netsh import PortProxy, kernel_refusal, parse_add
from hns.errors import InvalidRequest, KernelError
from nat.fake import FakeNft
from nat.fastpath import GUARD_RULES, LO4, PX_ADDR, PX_ANY, FastEntry, elements_by_map, fast_table
from portproxy.engine import Engine
from portproxy.tracker import DiagSocket

VM = IPv4Address("172.16.0.2")
NETS = [IPv4Network("172.16.0.0/24")]


def sock(address: str, port: int = 80, protocol: str = "tcp", v6only: bool = False,
         family: int = 2) -> DiagSocket:
    return DiagSocket(protocol, family, address, port, 10, v6only=v6only)


def test_entries_go_to_their_maps() -> None:
    lo = FastEntry("tcp", 8080, VM, 8080, localhost=True)
    any_ = FastEntry("udp", 53, VM, 5353)
    addr = FastEntry("tcp", 80, VM, 8080, address=IPv4Address("198.51.100.2"))
    groups = elements_by_map([addr, lo, any_])
    assert groups[LO4][0].render() == "tcp . 8080 : 172.16.0.2 . 8080"
    assert groups[PX_ANY][0].render() == "udp . 53 : 172.16.0.2 . 5353"
    assert groups[PX_ADDR][0].render() == "198.51.100.2 . tcp . 80 : 172.16.0.2 . 8080"


@pytest.mark.parametrize("bad", [
    {"protocol": "icmp"}, {"port": 0}, {"target_port": 65536},
    {"target": IPv6Address("::1")}, {"address": IPv4Address("10.0.0.1"), "localhost": True},
])
def test_bad_entries_are_refused(bad: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"protocol": "tcp", "port": 80, "target": VM, "target_port": 80}
    with pytest.raises(ValueError):
        FastEntry(**{**fields, **bad})


def test_the_table_has_the_guard_first_at_raw() -> None:
    table = fast_table("hns-t-fast", [FastEntry("tcp", 1, VM, 2, localhost=True)],
                       owner="hns:abc")
    guard = table.chains[0]
    assert (guard.hook, guard.priority, guard.rules) == ("prerouting", "raw", GUARD_RULES)
    text = table.render()
    assert 'iifname != "lo" ip daddr 127.0.0.0/8' in text and "ip6 daddr ::1" in text
    assert "tcp . 1 : 172.16.0.2 . 2" in text and 'comment "hns:abc"' in text


@pytest.mark.parametrize(("sockets", "want"), [
    ([sock("0.0.0.0")], {ForwardKey("tcp", 4, 80)}),
    ([sock("127.0.0.1")], set()),                                   # the VM's loopback only
    ([sock("::", family=10)], {ForwardKey("tcp", 4, 80)}),          # dual stack
    ([sock("::", family=10, v6only=True)], set()),                  # IPv6 stays on the relay
    ([sock("::ffff:0.0.0.0", family=10)], {ForwardKey("tcp", 4, 80)}),
    ([sock("::1", family=10)], set()),
    ([sock("172.16.0.2")], set()),                                  # not forwarded at all
    ([sock("0.0.0.0", 53, "udp")], {ForwardKey("udp", 4, 53)}),
])
def test_kernel_keys(sockets: list[DiagSocket], want: set[ForwardKey]) -> None:
    assert kernel_keys(sockets) == want


def proxy(kind: str = "v4tov4", **words: str) -> PortProxy:
    defaults = {"listenport": "8080", "connectaddress": str(VM)} if kind == "v4tov4" else \
        {"listenport": "8080"}
    return parse_add(kind, [f"{k}={v}" for k, v in {**defaults, **words}.items()])


def test_kernel_refusal() -> None:
    assert kernel_refusal(proxy(), NETS) is None
    assert kernel_refusal(proxy(listenaddress="198.51.100.2"), NETS) is None
    assert "family" in (kernel_refusal(proxy("v4tov6", connectaddress="fd00::2"), NETS) or "")
    assert "none of" in (kernel_refusal(proxy(connectaddress="198.51.100.1"), NETS) or "")
    assert "loopback" in (kernel_refusal(proxy(listenaddress="127.0.0.1"), NETS) or "")


def test_mode_is_parsed() -> None:
    assert proxy().mode == "auto"
    assert proxy(mode="Kernel").mode == "kernel"
    with pytest.raises(InvalidRequest, match="invalid mode"):
        proxy(mode="fast")


class _Store:
    instance = "t"
    instance_id = "0123456789abcdef"

    def __init__(self, bridges: list[str]) -> None:
        self._nets = [SimpleNamespace(bridge=b) for b in bridges]

    def networks(self) -> list[Any]:
        return self._nets


def fast_path(nft: FakeNft, localnet: list[tuple[str, bool]]) -> FastPath:
    store: Any = _Store(["br0", "br1"])
    return FastPath(Engine(), store, nft, localnet=lambda b, on: localnet.append((b, on)))


def lo4(nft: FakeNft) -> list[str]:
    table = nft.table("inet", "hns-t-fast")
    assert table is not None
    return [e.render() for m in table.maps if m.name == LO4 for e in m.elements]


def test_route_localnet_follows_the_localhost_entries() -> None:
    nft, localnet = FakeNft(error=KernelError), list[tuple[str, bool]]()
    fast = fast_path(nft, localnet)
    fast.reconcile()
    assert localnet == [("br0", False), ("br1", False)]     # left on by a killed daemon?
    localnet.clear()
    a = FastEntry("tcp", 80, VM, 80, localhost=True)
    b = FastEntry("udp", 53, VM, 53, localhost=True)
    assert fast.add("a", a, "br0") and fast.add("b", b, "br0")
    assert localnet == [("br0", True)] and len(lo4(nft)) == 2
    fast.remove("a")
    assert localnet == [("br0", True)]                      # b still needs it
    fast.remove("b")
    assert localnet == [("br0", True), ("br0", False)] and lo4(nft) == []
    fast.close()
    assert nft.table("inet", "hns-t-fast") is None
    assert not fast.add("c", a, "br0")                       # closed: nothing more


def test_a_removed_table_is_rendered_whole_again() -> None:
    nft, localnet = FakeNft(error=KernelError), list[tuple[str, bool]]()
    fast = fast_path(nft, localnet)
    fast.reconcile()
    fast.add("a", FastEntry("tcp", 80, VM, 80, localhost=True), "br0")
    nft._tables.clear()                          # someone ran `nft flush ruleset`
    assert fast.add("p", FastEntry("tcp", 81, VM, 80))      # refused, so rendered whole
    assert lo4(nft) == ["tcp . 80 : 172.16.0.2 . 80"]
    assert fast.status()["FastPath"]["Entries"] == 2


def test_close_sets_route_localnet_back() -> None:
    nft, localnet = FakeNft(error=KernelError), list[tuple[str, bool]]()
    fast = fast_path(nft, localnet)
    fast.add("a", FastEntry("tcp", 80, VM, 80, localhost=True), "br1")
    fast.close()
    assert localnet[-1] == ("br1", False) and fast.status()["FastPath"]["RouteLocalnet"] == []
