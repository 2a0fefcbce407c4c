r"""A small nftables ruleset model: typed objects (:class:`Table`, :class:`Chain` with its
rules as text, :class:`Set`, :class:`Map`, :class:`Element`) rendered to ``nft -f``
text, and the NAT table built of them.  Pure: no I/O.  Changes to a ruleset are
:class:`nat.transaction.Transaction`\ s of these objects.

Only typed, validated values reach the text: addresses and networks are ``ipaddress``
objects, interface names and identifiers are checked against strict patterns, element
atoms against a pattern without spaces, quotes or braces, so user input can never inject
nft syntax.

A table is replaced as one transaction (``Transaction.replace_table``): ``add table X``
(creates it if missing), ``delete table X``, then the full definition.  ``nft -f``
applies the three atomically, so packets see either the old table or the new one.

Port mappings (HNS's ``PortMapping`` policy) are elements of two maps with concatenated
keys, ``pm_any`` (protocol . port, every host address) and ``pm_addr`` (address .
protocol . port), looked up by one rule each in the ``dstnat`` chains: the cost of a
packet does not grow with the number of mappings, and adding or deleting one mapping is
one ``add element`` / ``delete element`` transaction that leaves the rules alone
(:func:`port_map_elements`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Network

__all__ = [
    "Chain",
    "Element",
    "Map",
    "NatSpec",
    "PortMapSpec",
    "Set",
    "Table",
    "count_chains",
    "count_key",
    "count_set",
    "hairpin_rule",
    "isolation_chain",
    "isolation_rules",
    "masquerade_rule",
    "nat_table",
    "port_map_elements",
    "port_maps",
]

_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_COMMENT = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")
DATA_TYPES = ("ipv4_addr", "ipv6_addr", "inet_proto", "inet_service")
_ATOM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}")
_BAD_IN_RULE = re.compile(r"[\n\r;#]")
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
    """A chain; a base chain has ``type``, ``hook`` and ``priority``.  ``rules`` are
    texts made by this package's builders from validated values (one line each)."""

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
        for rule in self.rules:
            if not rule.strip() or _BAD_IN_RULE.search(rule):
                raise ValueError(f"not one rule: {rule!r}")

    @property
    def header(self) -> str:
        """``type … hook … priority …; policy …;`` of a base chain, else empty."""
        if self.type is None:
            return ""
        return f"type {self.type} hook {self.hook} priority {self.priority}; policy {self.policy};"

    def definition(self) -> Chain:
        """The chain without its rules (what ``add chain`` declares)."""
        return replace(self, rules=())

    def render(self) -> str:
        lines = [f"\tchain {self.name} {{"]
        if self.type:
            lines.append(f"\t\t{self.header}")
        lines.extend(f"\t\t{rule}" for rule in self.rules)
        lines.append("\t}")
        return "\n".join(lines)


def _atoms(words: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(words, str):
        raise ValueError(f"{what} must be a sequence of atoms, not {words!r}")
    atoms = tuple(words)
    for atom in atoms:
        if not isinstance(atom, str) or not _ATOM.fullmatch(atom):
            raise ValueError(f"bad element atom {atom!r}")
    return atoms


@dataclass(frozen=True)
class Element:
    """One element of a set (``key``) or map (``key : value``); key and value are
    concatenations of atoms (``("tcp", "8080")`` is ``tcp . 8080``)."""

    key: tuple[str, ...]
    value: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", _atoms(self.key, "a key"))
        object.__setattr__(self, "value", _atoms(self.value, "a value"))
        if not self.key:
            raise ValueError("an element needs a key")

    @property
    def key_text(self) -> str:
        return " . ".join(self.key)

    @property
    def sort_key(self) -> tuple[tuple[int, int, str], ...]:
        """Numbers by value, other atoms by text (the canonical order of elements)."""
        return tuple((0, int(a), "") if a.isdigit() else (1, 0, a)
                     for a in (*self.key, *self.value))

    def render(self) -> str:
        return self.key_text + (f" : {' . '.join(self.value)}" if self.value else "")


def _data_types(words: tuple[str, ...], what: str) -> None:
    if not words:
        raise ValueError(f"a {what} needs a data type")
    for word in words:
        if word not in DATA_TYPES:
            raise ValueError(f"bad {what} data type {word!r}")


def _render_elements(elements: tuple[Element, ...]) -> list[str]:
    if not elements:
        return []
    return ["\t\telements = {", ",\n".join(f"\t\t\t{e.render()}" for e in elements),
            "\t\t}"]


@dataclass(frozen=True)
class Map:
    """A named map of concatenated ``key`` types to concatenated ``value`` types."""

    name: str
    key: tuple[str, ...]
    value: tuple[str, ...]
    elements: tuple[Element, ...] = ()

    def __post_init__(self) -> None:
        _ident(self.name)
        _data_types(self.key, "map")
        _data_types(self.value, "map")
        for e in self.elements:
            _check_element(self, e)

    @property
    def type_text(self) -> str:
        return f"{' . '.join(self.key)} : {' . '.join(self.value)}"

    def definition(self) -> Map:
        return replace(self, elements=())

    def canonical(self) -> Map:
        return replace(self, elements=tuple(sorted(set(self.elements),
                                                   key=lambda e: e.sort_key)))

    def render(self) -> str:
        return "\n".join([f"\tmap {self.name} {{", f"\t\ttype {self.type_text}",
                          *_render_elements(self.elements), "\t}"])


@dataclass(frozen=True)
class Set:
    """A named set of concatenated ``key`` types."""

    name: str
    key: tuple[str, ...]
    elements: tuple[Element, ...] = ()
    counter: bool = False        # every element counts the packets and bytes it matched

    def __post_init__(self) -> None:
        _ident(self.name)
        _data_types(self.key, "set")
        for e in self.elements:
            _check_element(self, e)

    @property
    def type_text(self) -> str:
        return " . ".join(self.key)

    def definition(self) -> Set:
        return replace(self, elements=())

    def canonical(self) -> Set:
        return replace(self, elements=tuple(sorted(set(self.elements),
                                                   key=lambda e: e.sort_key)))

    def render(self) -> str:
        counter = ["\t\tcounter"] if self.counter else []
        return "\n".join([f"\tset {self.name} {{", f"\t\ttype {self.type_text}", *counter,
                          *_render_elements(self.elements), "\t}"])


def _check_element(container: Set | Map, element: Element) -> None:
    """An element fits its set or map: as many atoms as types, a value for a map only."""
    value = container.value if isinstance(container, Map) else ()
    if len(element.key) != len(container.key) or len(element.value) != len(value):
        raise ValueError(f"element {element.render()!r} does not fit "
                         f"{container.name} ({container.type_text})")


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
        containers: tuple[Set | Map, ...] = (*self.sets, *self.maps)
        names = [x.name for x in containers]
        if len(set(names)) != len(names) or len(
                {c.name for c in self.chains}) != len(self.chains):
            raise ValueError(f"table {self.name}: a name is used twice")

    def canonical(self) -> Table:
        """The same table with the elements of its sets and maps in the canonical order
        (nft keeps no order of elements; :class:`nat.fake.FakeNft` lists them so)."""
        return replace(self, maps=tuple(m.canonical() for m in self.maps),
                       sets=tuple(x.canonical() for x in self.sets))

    @property
    def empty(self) -> bool:
        """No comment and nothing in it: a bare declaration."""
        return self.comment is None and not (self.chains or self.maps or self.sets)

    def render(self) -> str:
        head = [f'\tcomment "{self.comment}"'] if self.comment is not None else []
        body = "\n".join([*head, *(x.render() for x in self.sets),
                          *(m.render() for m in self.maps),
                          *(chain.render() for chain in self.chains)])
        return f"table {self.family} {self.name} {{\n{body}\n}}\n"


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
    def key(self) -> Element:
        """The element's key alone (what ``delete element`` names)."""
        return Element(self.element.key)

    @property
    def element(self) -> Element:
        key: tuple[str, ...] = (PROTOCOLS[self.protocol], str(self.external_port))
        if self.host_address is not None:
            key = (str(self.host_address), *key)
        return Element(key, (str(self.target), str(self.internal_port)))


PM_ANY = "pm_any"
PM_ADDR = "pm_addr"
PM_COUNT = "pm_count"
COUNT_PRIORITY = "filter - 20"
COUNT_RULES = (
    f"ct status dnat ct direction original ip daddr . meta l4proto . th dport @{PM_COUNT}",
    f"ct status dnat ct direction reply ip saddr . meta l4proto . th sport @{PM_COUNT}",
)
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


def count_key(target: IPv4Address | str, protocol: str, port: int | str) -> Element:
    """The counting set's element of a mapping's target (what the counter is read by)."""
    return Element((str(target), protocol, str(port)))


def count_set(mappings: Iterable[PortMapSpec]) -> Set:
    """The set that counts the mapped connections' packets, one element per target
    (VM address, protocol, VM port): mappings to one VM port share it."""
    keys = {count_key(m.target, PROTOCOLS[m.protocol], m.internal_port) for m in mappings}
    return Set(PM_COUNT, ("ipv4_addr", "inet_proto", "inet_service"),
               tuple(sorted(keys, key=lambda e: e.sort_key)), counter=True)


def count_chains() -> tuple[Chain, ...]:
    """Filter chains that only count (they accept nothing and drop nothing): packets of
    DNATed connections, both ways, at the target's element of the counting set.  Forward
    sees the outside's and the VMs' connections, output and input the host's own."""
    return tuple(Chain(f"count_{hook}", COUNT_RULES, type="filter", hook=hook,
                       priority=COUNT_PRIORITY) for hook in ("forward", "input", "output"))


def port_map_elements(mappings: Iterable[PortMapSpec]) -> dict[str, tuple[Element, ...]]:
    """The mappings' elements by map (``pm_any``, then ``pm_addr``; maps without one left
    out), in the given order: ``Transaction.add_elements`` adds them, and
    ``Transaction.delete_elements`` deletes them by key."""
    groups: dict[str, list[Element]] = {PM_ANY: [], PM_ADDR: []}
    for m in mappings:
        groups[m.map_name].append(m.element)
    return {name: tuple(items) for name, items in groups.items() if items}


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
    mappings = list(mappings)
    return Table("inet", name, (*chains, *count_chains()), port_maps(mappings),
                 (count_set(mappings),), comment=owner)


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
