"""nftables of mirrored (shared-IP) mode, pure: the VM's own table and the host's inbound
table (see docs/mirrored.md).

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

import re
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from nat.ruleset import Chain, Set, Table, _ident, _ifname

__all__ = [
    "VM_TABLE",
    "InboundPort",
    "inbound_table",
    "render_host_ports",
    "render_inbound_elements",
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


def render_host_ports(verb: str, keys: Iterable[tuple[int, str, int]]) -> str:
    """``add`` or ``delete`` (family, protocol, port) elements of the VM table's host-port
    sets: the host's loopback services the VM reaches at the host's address (host-address
    loopback: the ``output`` chain redirects them to the VM's loopback, where the daemon's
    relay to the host's loopback listens)."""
    if verb not in ("add", "delete"):
        raise ValueError(f"bad verb {verb!r}")
    lines = []
    for family, protocol, port in sorted(set(keys)):
        if protocol not in PROTOCOLS or type(port) is not int or not 1 <= port <= 65535:
            raise ValueError(f"bad host port {protocol!r} {port!r}")
        lines.append(f"{verb} element inet {VM_TABLE} {HOST_SETS[family]} "
                     f"{{ {protocol} . {port} }}\n")
    return "".join(lines)


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
    def key(self) -> str:
        return f"{self.protocol} . {self.port}"

    @property
    def element(self) -> str:
        return f"{self.key} : {self.target} . {self.port}"


def _maps(version: int) -> tuple[str, str]:
    return (f"in{version}", f"lo{version}")


def inbound_table(name: str, addresses: Iterable[IPv4Address | IPv6Address],
                  ports: Iterable[InboundPort] = (), owner: str | None = None) -> str:
    """The whole host-side inbound table as ``nft -f`` text (replacing any old one);
    ``owner``: the table's comment, the instance's tag that gc goes by."""
    _ident(name)
    if owner is not None and not re.fullmatch(r"[A-Za-z0-9:_.-]+", owner):
        raise ValueError(f"not a safe comment: {owner!r}")
    addrs = sorted(set(addresses), key=lambda a: (a.version, int(a)))
    ports = sorted(set(ports), key=lambda p: (p.version, p.protocol, p.port))
    lines = [f"table inet {name} {{}}", f"delete table inet {name}", f"table inet {name} {{"]
    if owner is not None:
        lines.append(f'\tcomment "{owner}"')
    for version, kind in ((4, "ipv4_addr"), (6, "ipv6_addr")):
        mine = [str(a) for a in addrs if a.version == version]
        body = f" elements = {{ {', '.join(mine)} }};" if mine else ""
        lines.append(f"\tset addrs{version} {{ type {kind};{body} }}")
        inbound, loop = _maps(version)
        for map_name, selected in ((inbound, ports), (loop, [p for p in ports if p.loopback])):
            els = [p.element for p in selected if p.version == version]
            body = f" elements = {{ {', '.join(els)} }};" if els else ""
            lines.append(f"\tmap {map_name} {{ type inet_proto . inet_service : "
                         f"{kind} . inet_service;{body} }}")
    rules_pre = [f"ip daddr @addrs4 dnat ip to meta l4proto . th dport map @{_maps(4)[0]}",
                 f"ip6 daddr @addrs6 dnat ip6 to meta l4proto . th dport map @{_maps(6)[0]}"]
    rules_out = [f"ip daddr @addrs4 meta l4proto . th dport @{_maps(4)[1]} "
                 f"ct mark set {MARK_HOST} dnat ip to meta l4proto . th dport map @{_maps(4)[1]}",
                 f"ip6 daddr @addrs6 meta l4proto . th dport @{_maps(6)[1]} "
                 f"ct mark set {MARK_HOST} dnat ip6 to meta l4proto . th dport map @{_maps(6)[1]}"]
    chains = [("prerouting", "nat", "prerouting", "-90", rules_pre),
              ("output", "nat", "output", "-90", rules_out),
              ("postrouting", "nat", "postrouting", "srcnat", [f"ct mark {MARK_HOST} masquerade"])]
    for chain, type_, hook, prio, rules in chains:
        lines.append(f"\tchain {chain} {{")
        lines.append(f"\t\ttype {type_} hook {hook} priority {prio}; policy accept;")
        lines.extend(f"\t\t{r}" for r in rules)
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_inbound_elements(verb: str, name: str, ports: Iterable[InboundPort]) -> str:
    """``add`` or ``delete`` the ports' elements (one transaction)."""
    if verb not in ("add", "delete"):
        raise ValueError(f"bad verb {verb!r}")
    _ident(name)
    out: list[str] = []
    for p in sorted(set(ports), key=lambda p: (p.version, p.protocol, p.port)):
        text = p.element if verb == "add" else p.key
        inbound, loop = _maps(p.version)
        out.append(f"{verb} element inet {name} {inbound} {{ {text} }}")
        if p.loopback:
            out.append(f"{verb} element inet {name} {loop} {{ {text} }}")
    return "".join(line + "\n" for line in out)
