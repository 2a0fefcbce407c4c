"""The daemon's fast table (``inet hns-<tag>-fast``), pure: the kernel data path of
localhost forwarding and of static port proxies, and the guard that goes with
``route_localnet`` (see docs/datapath.md).

- ``guard`` (filter prerouting, raw): a packet addressed to 127.0.0.0/8 or ::1 that
  arrived on any interface but ``lo`` is dropped before routing (CVE-2020-8558).
- ``lo4``: ``protocol . port : VM address . port``, looked up for ``127.0.0.1`` in nat
  output: the kernel's localhost forwards.
- ``px_any`` / ``px_addr``: ``[host address .] protocol . port : address . port``, looked
  up for non-loopback host addresses in nat prerouting and output: proxies served by
  DNAT, so the VM sees the client's address.
- nat postrouting masquerades what was DNATed from 127.0.0.0/8: it leaves the bridge
  from the gateway address, and the reply comes back to conntrack.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address

from nat.ruleset import PROTOCOLS, Chain, Element, Map, Table, _comment

__all__ = [
    "GUARD_RULES",
    "LO4",
    "PX_ADDR",
    "PX_ANY",
    "FastEntry",
    "elements_by_map",
    "fast_table",
]

LO4 = "lo4"
PX_ANY = "px_any"
PX_ADDR = "px_addr"
GUARD_RULES = (
    'iifname != "lo" ip daddr 127.0.0.0/8 counter drop comment "cve-2020-8558"',
    'iifname != "lo" ip6 daddr ::1 counter drop comment "cve-2020-8558"',
)
_LOCAL = "ip daddr != 127.0.0.0/8 fib daddr type local"
PROXY_RULES = (
    f"{_LOCAL} dnat ip to ip daddr . meta l4proto . th dport map @{PX_ADDR}",
    f"{_LOCAL} dnat ip to meta l4proto . th dport map @{PX_ANY}",
)
LOCALHOST_RULE = f"ip daddr 127.0.0.1 dnat ip to meta l4proto . th dport map @{LO4}"
MASQUERADE_RULE = 'ip saddr 127.0.0.0/8 ct status dnat masquerade comment "localhost"'


@dataclass(frozen=True, order=True)
class FastEntry:
    """One translation: ``protocol`` ("tcp"/"udp") ``port`` at host ``address`` (None:
    every non-loopback host address), or at host 127.0.0.1 when ``localhost``, to
    ``target``:``target_port``."""

    protocol: str
    port: int
    target: IPv4Address
    target_port: int
    address: IPv4Address | None = None
    localhost: bool = False

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS.values():
            raise ValueError(f"not a forwarded protocol: {self.protocol!r}")
        for port in (self.port, self.target_port):
            if type(port) is not int or not 1 <= port <= 65535:
                raise ValueError(f"not a port number: {port!r}")
        if not isinstance(self.target, IPv4Address):
            raise ValueError(f"not an IPv4 address: {self.target!r}")
        if self.address is not None and (self.localhost or
                                         not isinstance(self.address, IPv4Address)):
            raise ValueError(f"bad listen address {self.address!r}")

    @property
    def map_name(self) -> str:
        if self.localhost:
            return LO4
        return PX_ANY if self.address is None else PX_ADDR

    @property
    def element(self) -> Element:
        key: tuple[str, ...] = (self.protocol, str(self.port))
        if self.address is not None:
            key = (str(self.address), *key)
        return Element(key, (str(self.target), str(self.target_port)))


def elements_by_map(entries: Iterable[FastEntry]) -> dict[str, tuple[Element, ...]]:
    """The entries' elements by map (maps without one left out), in a stable order."""
    groups: dict[str, list[Element]] = {}
    for entry in sorted(set(entries)):
        groups.setdefault(entry.map_name, []).append(entry.element)
    return {name: tuple(items) for name, items in groups.items()}


def _maps(entries: Iterable[FastEntry]) -> tuple[Map, ...]:
    groups = elements_by_map(entries)
    service = ("ipv4_addr", "inet_service")
    short = ("inet_proto", "inet_service")
    return (Map(LO4, short, service, groups.get(LO4, ())),
            Map(PX_ANY, short, service, groups.get(PX_ANY, ())),
            Map(PX_ADDR, ("ipv4_addr", *short), service, groups.get(PX_ADDR, ())))


def fast_table(name: str, entries: Iterable[FastEntry] = (), owner: str | None = None
               ) -> Table:
    """The whole table with its elements."""
    if owner is not None:
        _comment(owner)
    chains = (
        Chain("guard", GUARD_RULES, type="filter", hook="prerouting", priority="raw"),
        Chain("pre", PROXY_RULES, type="nat", hook="prerouting", priority="dstnat"),
        Chain("out", (LOCALHOST_RULE, *PROXY_RULES), type="nat", hook="output",
              priority="-100"),
        Chain("post", (MASQUERADE_RULE,), type="nat", hook="postrouting", priority="srcnat"),
    )
    return Table("inet", name, chains, _maps(entries), comment=owner)
