"""A small nftables ruleset model, rendered to ``nft -f`` text.  Pure: no I/O.

Only typed, validated values reach the text: addresses and networks are ``ipaddress``
objects, interface names and identifiers are checked against strict patterns, so user
input can never inject nft syntax.

A table is replaced as one transaction: ``table X {}`` (creates it if missing), ``delete
table X``, then the full definition.  ``nft -f`` applies the three atomically, so packets
see either the old table or the new one.

Port mappings (HNS's ``PortMapping`` policy) are elements of two maps with concatenated
keys, ``pm_any`` (protocol . port, every host address) and ``pm_addr`` (address .
protocol . port), looked up by one rule each in the ``dstnat`` chains: the cost of a
packet does not grow with the number of mappings, and adding or deleting one mapping is
one ``add element`` / ``delete element`` transaction that leaves the rules alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Network

__all__ = [
    "Chain",
    "Map",
    "NatSpec",
    "PortMapSpec",
    "Set",
    "Table",
    "hairpin_rule",
    "isolation_chain",
    "isolation_rules",
    "masquerade_rule",
    "nat_table",
    "port_maps",
    "render_add_port_mappings",
    "render_delete",
    "render_delete_port_mappings",
    "render_replace",
]

_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_COMMENT = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")
DATA_TYPES = ("ipv4_addr", "inet_proto", "inet_service")
PROTOCOLS = {6: "tcp", 17: "udp"}


def _ident(text: str) -> str:
    if not _IDENT.fullmatch(text):
        raise ValueError(f"not an nft identifier: {text!r}")
    return text


def _ifname(text: str) -> str:
    if not _IFNAME.fullmatch(text):
        raise ValueError(f"not an interface name: {text!r}")
    return text


def _comment(text: str) -> str:
    if not _COMMENT.fullmatch(text):
        raise ValueError(f"not a safe comment: {text!r}")
    return text


@dataclass(frozen=True)
class Chain:
    name: str
    rules: tuple[str, ...] = ()
    type: str | None = None
    hook: str | None = None
    priority: str | None = None
    policy: str = "accept"

    def __post_init__(self) -> None:
        _ident(self.name)
        base = (self.type, self.hook, self.priority)
        if any(w is not None for w in base) and any(w is None for w in base):
            raise ValueError("a base chain needs type, hook and priority together")
        for word in base:
            if word is not None and not re.fullmatch(r"[a-z0-9+ -]+", word):
                raise ValueError(f"bad chain attribute {word!r}")
        if self.policy not in ("accept", "drop"):
            raise ValueError(f"bad chain policy {self.policy!r}")

    def render(self) -> str:
        lines = [f"\tchain {self.name} {{"]
        if self.type:
            lines.append(f"\t\ttype {self.type} hook {self.hook} priority {self.priority}; "
                         f"policy {self.policy};")
        lines.extend(f"\t\t{rule}" for rule in self.rules)
        lines.append("\t}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Map:
    """A map; ``elements`` are ``key : value`` texts made by this module's renderers."""

    name: str
    key: tuple[str, ...]
    value: tuple[str, ...]
    elements: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _ident(self.name)
        for word in (*self.key, *self.value):
            if word not in DATA_TYPES:
                raise ValueError(f"bad map data type {word!r}")

    def render(self) -> str:
        lines = [f"\tmap {self.name} {{",
                 f"\t\ttype {' . '.join(self.key)} : {' . '.join(self.value)}"]
        if self.elements:
            lines.append("\t\telements = {")
            lines.append(",\n".join(f"\t\t\t{e}" for e in self.elements))
            lines.append("\t\t}")
        lines.append("\t}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Set:
    """A named set of concatenated ``key`` types (elements are added later)."""

    name: str
    key: tuple[str, ...]

    def __post_init__(self) -> None:
        _ident(self.name)
        for word in self.key:
            if word not in DATA_TYPES:
                raise ValueError(f"bad set data type {word!r}")

    def render(self) -> str:
        return f"\tset {self.name} {{\n\t\ttype {' . '.join(self.key)}\n\t}}"


@dataclass(frozen=True)
class Table:
    family: str
    name: str
    chains: tuple[Chain, ...] = field(default=())
    maps: tuple[Map, ...] = field(default=())
    sets: tuple[Set, ...] = field(default=())
    comment: str | None = None   # the owner's tag: gc removes only tables carrying its own

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"bad table family {self.family!r}")
        _ident(self.name)
        if self.comment is not None:
            _comment(self.comment)

    def render(self) -> str:
        head = [f'\tcomment "{self.comment}"'] if self.comment is not None else []
        body = "\n".join([*head, *(x.render() for x in self.sets),
                          *(m.render() for m in self.maps),
                          *(chain.render() for chain in self.chains)])
        return f"table {self.family} {self.name} {{\n{body}\n}}\n"


def render_delete(family: str, name: str) -> str:
    """Delete a table if it exists (idempotent: declaring it first never fails)."""
    table = Table(family, name)
    return f"table {table.family} {table.name} {{}}\ndelete table {table.family} {table.name}\n"


def render_replace(table: Table) -> str:
    return render_delete(table.family, table.name) + table.render()


def masquerade_rule(subnet: IPv4Network | IPv6Network, bridge: str, comment: str) -> str:
    """Masquerade what the subnet sends anywhere but back into its own bridge."""
    if isinstance(subnet, IPv6Network):
        return (f'ip6 saddr {subnet} oifname != "{_ifname(bridge)}" masquerade '
                f'comment "{_comment(comment)}"')
    return (f'ip saddr {IPv4Network(subnet)} oifname != "{_ifname(bridge)}" masquerade '
            f'comment "{_comment(comment)}"')


@dataclass(frozen=True)
class NatSpec:
    """What the NAT table needs to know of one network."""

    id: str
    subnet: IPv4Network
    bridge: str
    subnet6: IPv6Network | None = None    # mirrored networks' transit prefix
    isolated: bool = True                 # WSL's firewall: nothing unsolicited gets in


def _port(value: int) -> int:
    if type(value) is not int or not 1 <= value <= 65535:
        raise ValueError(f"not a port number: {value!r}")
    return value


def _ipv4(value: IPv4Address) -> IPv4Address:
    if not isinstance(value, IPv4Address):
        raise ValueError(f"not an IPv4 address: {value!r}")
    return value


@dataclass(frozen=True)
class PortMapSpec:
    """One port mapping: host (address or every address) protocol/port -> target:port."""

    protocol: int
    external_port: int
    target: IPv4Address
    internal_port: int
    host_address: IPv4Address | None = None

    def __post_init__(self) -> None:
        if type(self.protocol) is not int or self.protocol not in PROTOCOLS:
            raise ValueError(f"not a mapped protocol: {self.protocol!r}")
        _port(self.external_port)
        _port(self.internal_port)
        _ipv4(self.target)
        if self.host_address is not None:
            _ipv4(self.host_address)

    @property
    def map_name(self) -> str:
        return PM_ANY if self.host_address is None else PM_ADDR

    @property
    def key(self) -> str:
        key = f"{PROTOCOLS[self.protocol]} . {self.external_port}"
        return key if self.host_address is None else f"{self.host_address} . {key}"

    @property
    def element(self) -> str:
        return f"{self.key} : {self.target} . {self.internal_port}"


PM_ANY = "pm_any"
PM_ADDR = "pm_addr"
_NOT_LOOPBACK = "ip daddr != 127.0.0.0/8 fib daddr type local"
DNAT_RULES = (
    f"{_NOT_LOOPBACK} dnat ip to ip daddr . meta l4proto . th dport map @{PM_ADDR}",
    f"{_NOT_LOOPBACK} dnat ip to meta l4proto . th dport map @{PM_ANY}",
)


def hairpin_rule(subnet: IPv4Network, comment: str) -> str:
    """Masquerade DNATed traffic from the subnet back into it (a VM reaching a mapped
    port, its own or another VM's): the reply must come back through the host."""
    net = IPv4Network(subnet)
    return f'ct status dnat ip saddr {net} ip daddr {net} masquerade comment "{_comment(comment)}"'


def port_maps(mappings: Iterable[PortMapSpec]) -> tuple[Map, Map]:
    """The two maps with their elements, in a stable order."""
    ordered = sorted(mappings, key=lambda m: (m.protocol, m.external_port,
                                              m.host_address or IPv4Address(0)))
    any_ = tuple(m.element for m in ordered if m.host_address is None)
    addr = tuple(m.element for m in ordered if m.host_address is not None)
    service = ("ipv4_addr", "inet_service")
    return (Map(PM_ANY, ("inet_proto", "inet_service"), service, any_),
            Map(PM_ADDR, ("ipv4_addr", "inet_proto", "inet_service"), service, addr))


def nat_table(name: str, networks: Iterable[NatSpec],
              mappings: Iterable[PortMapSpec] = (), owner: str | None = None) -> Table:
    """The instance's table: masquerade per network, port mappings (maps, DNAT, hairpin),
    and the isolation of the networks (``forward``)."""
    nets = sorted(networks, key=lambda n: n.id)
    rules: Sequence[str] = [
        *(masquerade_rule(n.subnet, n.bridge, f"net:{n.id}") for n in nets),
        *(masquerade_rule(n.subnet6, n.bridge, f"net6:{n.id}") for n in nets
          if n.subnet6 is not None),
        *(hairpin_rule(n.subnet, f"hairpin:{n.id}") for n in nets),
    ]
    postrouting = Chain("postrouting", tuple(rules), type="nat", hook="postrouting",
                        priority="srcnat")
    prerouting = Chain("prerouting", DNAT_RULES, type="nat", hook="prerouting",
                       priority="dstnat")
    output = Chain("output", DNAT_RULES, type="nat", hook="output", priority="-100")
    chains = [postrouting, prerouting, output]
    forward = isolation_chain(nets)
    if forward is not None:
        chains.append(forward)
    return Table("inet", name, tuple(chains), port_maps(mappings), comment=owner)


FORWARD_PRIORITY = "filter - 10"


def isolation_rules(bridge: str, net_id: str) -> tuple[str, ...]:
    """What may be forwarded into one network's bridge: traffic of its own bridge and
    connections hns translated there (port mappings, mirrored inbound); nothing else
    that is new (the outside, another network, a LAN peer routing the subnet through
    the host).  Replies of connections the VMs opened pass the chain's first rule."""
    dev = _ifname(bridge)
    return (f'oifname "{dev}" iifname "{dev}" accept comment "{_comment(f"same:{net_id}")}"',
            f'oifname "{dev}" ct status dnat accept comment "{_comment(f"mapped:{net_id}")}"',
            f'oifname "{dev}" drop comment "{_comment(f"isolate:{net_id}")}"')


def isolation_chain(networks: Iterable[NatSpec]) -> Chain | None:
    """The ``forward`` chain of the isolated networks (None when there is none).

    A filter chain of our own at priority ``filter - 10``: it only ever drops traffic
    addressed to our bridges, so other tables' chains are not affected (an accept here
    ends this chain only, a drop is final everywhere, as nftables has it)."""
    nets = [n for n in networks if n.isolated]
    if not nets:
        return None
    rules = ("ct state established,related accept",
             *(rule for n in nets for rule in isolation_rules(n.bridge, n.id)))
    return Chain("forward", rules, type="filter", hook="forward", priority=FORWARD_PRIORITY)


def _render_elements(verb: str, table: str, mappings: Iterable[PortMapSpec],
                     text: Callable[[PortMapSpec], str]) -> str:
    Table("inet", table)  # validates the name
    groups: dict[str, list[str]] = {PM_ANY: [], PM_ADDR: []}
    for m in mappings:
        groups[m.map_name].append(text(m))
    return "".join(f"{verb} element inet {table} {name} {{ {', '.join(items)} }}\n"
                   for name, items in groups.items() if items)


def render_add_port_mappings(table: str, mappings: Iterable[PortMapSpec]) -> str:
    """Add elements to the maps of an existing table: one transaction."""
    return _render_elements("add", table, mappings, lambda m: m.element)


def render_delete_port_mappings(table: str, mappings: Iterable[PortMapSpec]) -> str:
    """Delete elements (by key) from the maps: one transaction."""
    return _render_elements("delete", table, mappings, lambda m: m.key)
