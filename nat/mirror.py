"""nftables of mirrored (shared-IP) mode, pure: the VM's own table and the host's inbound
table as :class:`~nat.ruleset.Table` objects, and the elements that change them (see
docs/mirrored.md).

VM side, table ``inet hns-mirror`` in the VM namespace: what leaves ``eth0`` from a
mirrored address is SNATed to the VM's transit address; a new connection arriving for
the transit address is DNATed to the primary mirrored address of its family.

Host side, table ``inet <name>`` owned by the daemon: sets of the host's mirrored
addresses and maps ``protocol . port : transit address . port`` per family, looked up by
one DNAT rule per family in ``prerouting`` (and in ``output`` through the ``lo`` maps
when a network has host-address loopback on); host-originated DNATed traffic is
masqueraded (to the transit gateway) so that the VM's reply comes back through the host.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from nat.ruleset import Chain, Element, Map, Set, Table, _ifname

__all__ = [
    "VM_TABLE",
    "InboundPort",
    "host_port_elements",
    "inbound_elements",
    "inbound_table",
    "vm_table",
]

VM_TABLE = "hns-mirror"
HOST_SETS = {4: "host4", 6: "host6"}
PROTOCOLS = ("tcp", "udp")
MARK_HOST = "0x686e7301"     # conntrack mark of host-originated inbound (output DNAT)


def vm_table(ifname: str, transit4: IPv4Address, transit6: IPv6Address,
             primary4: IPv4Address | None, primary6: IPv6Address | None) -> Table:
    dev = _ifname(ifname)
    if not isinstance(transit4, IPv4Address) or not isinstance(transit6, IPv6Address):
        raise ValueError("transit addresses must be IPv4 and IPv6 addresses")
    pre: list[str] = []
    out: list[str] = []
    post = [f'oifname "{dev}" ip saddr != {transit4} snat ip to {transit4}',
            f'oifname "{dev}" ip6 saddr != {transit6} ip6 saddr != fe80::/10 '
            f'snat ip6 to {transit6}']
    if primary4 is not None:
        pre.append(f'iifname "{dev}" ip daddr {transit4} '
                   f'dnat ip to {IPv4Address(primary4)}')
        out.append(f"ip daddr {IPv4Address(primary4)} meta l4proto . th dport @{HOST_SETS[4]} "
                   "redirect")
    if primary6 is not None:
        pre.append(f'iifname "{dev}" ip6 daddr {transit6} dnat ip6 to {IPv6Address(primary6)}')
        out.append(f"ip6 daddr {IPv6Address(primary6)} meta l4proto . th dport "
                   f"@{HOST_SETS[6]} redirect")
    return Table("inet", VM_TABLE, (
        Chain("prerouting", tuple(pre), type="nat", hook="prerouting", priority="dstnat"),
        Chain("output", tuple(out), type="nat", hook="output", priority="-100"),
        Chain("postrouting", tuple(post), type="nat", hook="postrouting", priority="srcnat"),
    ), sets=tuple(Set(name, ("inet_proto", "inet_service")) for name in HOST_SETS.values()))


def host_port_elements(keys: Iterable[tuple[int, str, int]]
                       ) -> dict[str, tuple[Element, ...]]:
    """The elements of (family, protocol, port) keys, by set of the VM table: the host's
    loopback services the VM reaches at the host's address (host-address loopback: the
    ``output`` chain redirects them to the VM's loopback, where the daemon's relay to the
    host's loopback listens)."""
    groups: dict[str, list[Element]] = {}
    for family, protocol, port in sorted(set(keys)):
        if protocol not in PROTOCOLS or type(port) is not int or not 1 <= port <= 65535:
            raise ValueError(f"bad host port {protocol!r} {port!r}")
        groups.setdefault(HOST_SETS[family], []).append(Element((protocol, str(port))))
    return {name: tuple(items) for name, items in groups.items()}


@dataclass(frozen=True, order=True)
class InboundPort:
    """Host port (``protocol``, ``port``) of one family goes to ``target`` (a VM's
    transit address) at the same port; ``loopback``: also for the host itself reaching
    its own address (host-address loopback)."""

    protocol: str
    port: int
    target: IPv4Address | IPv6Address
    loopback: bool = False

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"not a protocol: {self.protocol!r}")
        if type(self.port) is not int or not 1 <= self.port <= 65535:
            raise ValueError(f"not a port number: {self.port!r}")
        if not isinstance(self.target, IPv4Address | IPv6Address):
            raise ValueError(f"not an address: {self.target!r}")

    @property
    def version(self) -> int:
        return self.target.version

    @property
    def element(self) -> Element:
        return Element((self.protocol, str(self.port)), (str(self.target), str(self.port)))


def _maps(version: int) -> tuple[str, str]:
    return (f"in{version}", f"lo{version}")


def _ordered(ports: Iterable[InboundPort]) -> list[InboundPort]:
    return sorted(set(ports), key=lambda p: (p.version, p.protocol, p.port))


def inbound_table(name: str, addresses: Iterable[IPv4Address | IPv6Address],
                  ports: Iterable[InboundPort] = (), owner: str | None = None) -> Table:
    """The whole host-side inbound table; ``owner``: the table's comment, the instance's
    tag that gc goes by."""
    addrs = sorted(set(addresses), key=lambda a: (a.version, int(a)))
    ordered = _ordered(ports)
    sets: list[Set] = []
    maps: list[Map] = []
    for version, kind in ((4, "ipv4_addr"), (6, "ipv6_addr")):
        sets.append(Set(f"addrs{version}", (kind,),
                        tuple(Element((str(a),)) for a in addrs if a.version == version)))
        inbound, loop = _maps(version)
        for map_name, selected in ((inbound, ordered),
                                   (loop, [p for p in ordered if p.loopback])):
            maps.append(Map(map_name, ("inet_proto", "inet_service"), (kind, "inet_service"),
                            tuple(p.element for p in selected if p.version == version)))
    return Table("inet", name, _inbound_chains(), tuple(maps), tuple(sets), comment=owner)


def _inbound_chains() -> tuple[Chain, ...]:
    pre = tuple(f"{ip} daddr @addrs{v} dnat {ip} to meta l4proto . th dport map @in{v}"
                for v, ip in ((4, "ip"), (6, "ip6")))
    out = tuple(f"{ip} daddr @addrs{v} meta l4proto . th dport @lo{v} "
                f"ct mark set {MARK_HOST} dnat {ip} to meta l4proto . th dport map @lo{v}"
                for v, ip in ((4, "ip"), (6, "ip6")))
    return (Chain("prerouting", pre, type="nat", hook="prerouting", priority="-90"),
            Chain("output", out, type="nat", hook="output", priority="-90"),
            Chain("postrouting", (f"ct mark {MARK_HOST} masquerade",), type="nat",
                  hook="postrouting", priority="srcnat"))


def inbound_elements(ports: Iterable[InboundPort]) -> dict[str, tuple[Element, ...]]:
    """The ports' elements, by map of the inbound table (``lo`` maps too for loopback
    ports): ``Transaction.add_elements`` adds them, ``delete_elements`` deletes them."""
    groups: dict[str, list[Element]] = {}
    for p in _ordered(ports):
        inbound, loop = _maps(p.version)
        groups.setdefault(inbound, []).append(p.element)
        if p.loopback:
            groups.setdefault(loop, []).append(p.element)
    return {name: tuple(items) for name, items in groups.items()}
