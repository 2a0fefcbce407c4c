"""A small nftables ruleset model, rendered to ``nft -f`` text.  Pure: no I/O.

Only typed, validated values reach the text: addresses and networks are ``ipaddress``
objects, interface names and identifiers are checked against strict patterns, so user
input can never inject nft syntax.

A table is replaced as one transaction: ``table X {}`` (creates it if missing), ``delete
table X``, then the full definition.  ``nft -f`` applies the three atomically, so packets
see either the old table or the new one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network

__all__ = ["Chain", "Table", "masquerade_rule", "nat_table", "render_delete", "render_replace"]

_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_COMMENT = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")


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
class Table:
    family: str
    name: str
    chains: tuple[Chain, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"bad table family {self.family!r}")
        _ident(self.name)

    def render(self) -> str:
        body = "\n".join(chain.render() for chain in self.chains)
        return f"table {self.family} {self.name} {{\n{body}\n}}\n"


def render_delete(family: str, name: str) -> str:
    """Delete a table if it exists (idempotent: declaring it first never fails)."""
    table = Table(family, name)
    return f"table {table.family} {table.name} {{}}\ndelete table {table.family} {table.name}\n"


def render_replace(table: Table) -> str:
    return render_delete(table.family, table.name) + table.render()


def masquerade_rule(subnet: IPv4Network, bridge: str, comment: str) -> str:
    """Masquerade what the subnet sends anywhere but back into its own bridge."""
    return (f'ip saddr {IPv4Network(subnet)} oifname != "{_ifname(bridge)}" masquerade '
            f'comment "{_comment(comment)}"')


@dataclass(frozen=True)
class NatSpec:
    """What the NAT table needs to know of one network."""

    id: str
    subnet: IPv4Network
    bridge: str


def nat_table(name: str, networks: Iterable[NatSpec]) -> Table:
    rules: Sequence[str] = [masquerade_rule(n.subnet, n.bridge, f"net:{n.id}")
                            for n in sorted(networks, key=lambda n: n.id)]
    postrouting = Chain("postrouting", tuple(rules), type="nat", hook="postrouting",
                        priority="srcnat")
    return Table("inet", name, (postrouting,))
