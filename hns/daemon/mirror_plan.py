"""Port coordination of mirrored networks, the pure half (see docs/mirrored.md).

Inputs are the listening sockets of each mirrored VM and of the host (as sock_diag
reports them, the daemon's own relay sockets already left out), the host's mirrored
addresses, the host ports that kernel port mappings hold, and each VM's ignored ports.

A VM socket asks for a key (protocol, family, port) -- what it is bound to decides
where it is served:

=========================================  ===========  ==============================
VM socket bound to                         inbound      host loopback relay dials
=========================================  ===========  ==============================
``0.0.0.0``                                yes          VM ``127.0.0.1``
``127.0.0.1``                              no           VM ``127.0.0.1``
``::``                                     yes          VM ``::1`` (and, dual stack,
                                                        the IPv4 key too)
``::1``                                    no           VM ``::1``
the primary mirrored address               yes          that address
=========================================  ===========  ==============================

*Inbound* means: the host's address:port reaches the VM (kernel DNAT).  A loopback-only
VM socket is never exposed on a host address.

A key is not taken from the host: when the host itself listens on the port (on a
wildcard, loopback or one of its addresses) or a kernel port mapping holds it, every
claim on it is a conflict.  Between VMs, the first claim seen holds the key (the
sequence numbers of :class:`~hns.daemon.forward_plan.Claims`).  Ignored ports are never
claimed, nor are the DHCP client ports (``NEVER_FORWARDED``).

A key a VM owns stays its own while the VM still has a TCP connection it accepted on
the port (a socket in a connected state whose local port it is), as WSL keeps it:
``draining`` gives those keys of each VM (:func:`draining` finds them from the previous
owners), which compete as claims of their old sequence numbers and are owned again
(``MirrorPlan.draining``), or dropped without a conflict when the host or a port mapping
holds the port.  The ephemeral cap of localhost forwarding
(:func:`~hns.daemon.forward_plan.over_cap`) applies to the owned keys: each of them is a
host loopback listener.

The other direction: each host socket listening on loopback or a wildcard is served
inside every mirrored VM on the VM's loopback of the family (``reverse``), except in a
VM that listens on that key itself and for its ignored ports.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from hns.daemon.forward_plan import ForwardKey, PortRange, cap_reason, over_cap
from portproxy.tracker import DiagSocket

__all__ = ["NEVER_FORWARDED", "Claim", "MirrorPlan", "draining", "host_keys", "plan",
           "vm_claims"]

# Host traffic never steered into a VM, as WSL keeps UDP 68: the DHCP clients' ports
# (the host's own DHCP client uses a raw socket, which no sock_diag dump shows, so the
# port would not look taken).
NEVER_FORWARDED = frozenset({("udp", 68), ("udp", 546)})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_ANY4 = ipaddress.IPv4Address("0.0.0.0")
_ANY6 = ipaddress.IPv6Address("::")
_LOOP4 = ipaddress.IPv4Address("127.0.0.1")
_LOOP6 = ipaddress.IPv6Address("::1")


@dataclass(frozen=True)
class Claim:
    """What a VM wants for one key: the address its relay dials in the VM, and whether
    the host's address reaches it too (inbound)."""

    target: str
    inbound: bool


def _address(sock: DiagSocket) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(sock.address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _socket_claims(sock: DiagSocket, primary: Iterable[IPAddress]
                   ) -> list[tuple[ForwardKey, Claim]]:
    address = _address(sock)
    if address is None:
        return []
    key = ForwardKey(sock.protocol, address.version, sock.port)
    if address == _ANY4:
        return [(key, Claim("127.0.0.1", True))]
    if address == _LOOP4:
        return [(key, Claim("127.0.0.1", False))]
    if address == _ANY6:
        found = [(key, Claim("::1", True))]
        if not sock.v6only:
            found.append((ForwardKey(sock.protocol, 4, sock.port), Claim("127.0.0.1", True)))
        return found
    if address == _LOOP6:
        return [(key, Claim("::1", False))]
    if address in set(primary):
        return [(key, Claim(str(address), True))]
    return []


def vm_claims(sockets: Iterable[DiagSocket], primary: Iterable[IPAddress],
              ignored: Iterable[int] = ()) -> dict[ForwardKey, Claim]:
    """The keys a VM's listening sockets ask for; with several sockets on one key, the
    relay dials loopback if any of them is on loopback or a wildcard, and the key is
    inbound if any of them is."""
    primary, skip = tuple(primary), frozenset(ignored)
    claims: dict[ForwardKey, Claim] = {}
    for sock in sockets:
        if sock.port in skip or (sock.protocol, sock.port) in NEVER_FORWARDED:
            continue
        for key, claim in _socket_claims(sock, primary):
            old = claims.get(key)
            if old is None:
                claims[key] = claim
                continue
            loop = key.loopback
            target = loop if loop in (old.target, claim.target) else old.target
            claims[key] = Claim(target, old.inbound or claim.inbound)
    return claims


def host_keys(sockets: Iterable[DiagSocket], addresses: Iterable[IPAddress]
              ) -> tuple[frozenset[ForwardKey], frozenset[ForwardKey]]:
    """(keys the host holds, keys it serves on loopback): a socket on a wildcard or
    loopback holds its key and is served on loopback; one on a host address holds it."""
    own = frozenset(addresses)
    held: set[ForwardKey] = set()
    local: set[ForwardKey] = set()
    for sock in sockets:
        address = _address(sock)
        if address is None:
            continue
        keys = [ForwardKey(sock.protocol, address.version, sock.port)]
        if address == _ANY6 and not sock.v6only:
            keys.append(ForwardKey(sock.protocol, 4, sock.port))
        if address.is_unspecified or address.is_loopback:
            held.update(keys)
            if address.is_unspecified or address in (_LOOP4, _LOOP6):
                local.update(keys)
        elif address in own:
            held.update(keys)
    return frozenset(held), frozenset(local)


@dataclass(frozen=True)
class MirrorPlan:
    """``owners``: the VM served on each key, with its claim; ``conflicts``: (vm, key) ->
    why not; ``reverse``: (vm, key) of each host loopback service served in a VM;
    ``draining``: (vm, key) of the owned keys the VM no longer listens on but still has
    connections on."""

    owners: Mapping[ForwardKey, tuple[str, Claim]] = field(default_factory=dict)
    conflicts: Mapping[tuple[str, ForwardKey], str] = field(default_factory=dict)
    reverse: frozenset[tuple[str, ForwardKey]] = frozenset()
    draining: frozenset[tuple[str, ForwardKey]] = frozenset()


def draining(owners: Mapping[ForwardKey, tuple[str, Claim]],
             claims: Mapping[str, Mapping[ForwardKey, Claim]],
             connected: Mapping[str, Iterable[int]]) -> dict[str, dict[ForwardKey, Claim]]:
    """The TCP keys each VM of ``claims`` owned (``owners``, the previous plan's) and no
    longer claims, on whose port it still has connections (``connected``: its ports)."""
    ports = {vm: frozenset(p) for vm, p in connected.items()}
    kept: dict[str, dict[ForwardKey, Claim]] = {}
    for key, (vm, claim) in owners.items():
        if (key.protocol == "tcp" and vm in claims and key not in claims[vm]
                and key.port in ports.get(vm, ())):
            kept.setdefault(vm, {})[key] = claim
    return kept


def plan(claims: Mapping[str, Mapping[ForwardKey, Claim]],
         order: Mapping[str, Mapping[ForwardKey, int]],
         host_held: frozenset[ForwardKey], host_local: frozenset[ForwardKey],
         reserved: Mapping[tuple[str, int], str] | None = None,
         ignored: Mapping[str, Iterable[int]] | None = None, *,
         drain: Mapping[str, Mapping[ForwardKey, Claim]] | None = None,
         ephemeral: PortRange | None = None) -> MirrorPlan:
    """Owners and conflicts of the VMs' claims, and the reverse forwards.

    ``order``: each claim's sequence number (lowest first); ``reserved``: (protocol,
    port) -> what holds it (a kernel port mapping); ``ignored``: each VM's ignored
    ports (for the reverse direction; its claims come without them); ``drain``: the
    keys each VM keeps for its connections (:func:`draining`); ``ephemeral``: the host's
    ephemeral port range, for the cap.
    """
    reserved, drain = reserved or {}, drain or {}
    wanted = {vm: {**drain.get(vm, {}), **keys} for vm, keys in claims.items()}
    best: dict[ForwardKey, tuple[int, str]] = {}
    conflicts: dict[tuple[str, ForwardKey], str] = {}
    for vm, asked in wanted.items():
        for key in asked:
            holder = reserved.get((key.protocol, key.port))
            if key in host_held or holder is not None:
                if key in claims[vm]:
                    conflicts[(vm, key)] = ("the host listens on it" if key in host_held
                                            else f"held by {holder}")
                continue
            seq = order.get(vm, {}).get(key, 0)
            if key not in best or (seq, vm) < best[key]:
                best[key] = (seq, vm)
    capped = over_cap(best, ephemeral)
    owners = {key: (vm, wanted[vm][key]) for key, (_seq, vm) in sorted(best.items())
              if key not in capped}
    for vm, keys in claims.items():
        for key in keys:
            owner = owners.get(key)
            if (vm, key) in conflicts or (owner is not None and owner[0] == vm):
                continue
            conflicts[(vm, key)] = (f"held by vm {owner[0]}" if owner is not None
                                    else cap_reason(ephemeral or (0, 0)))
    ignored = ignored or {}
    reverse = frozenset(
        (vm, key) for vm in claims for key in host_local
        if key not in wanted[vm] and key.port not in set(ignored.get(vm, ())))
    kept = frozenset((vm, key) for key, (vm, _claim) in owners.items()
                     if key not in claims[vm])
    return MirrorPlan(owners, conflicts, reverse, kept)
