"""Localhost forwarding, the pure half: which host loopback ports to serve, for which VM.

The desired forwards are a function of the VMs' listening sockets alone:

========================================  ==========================================
VM socket bound to                        host listener -> target in the VM
========================================  ==========================================
``0.0.0.0`` or ``127.0.0.1``              ``127.0.0.1:P`` -> VM ``127.0.0.1:P``
``::`` or ``::1``                         ``[::1]:P`` -> VM ``[::1]:P``
``::`` dual stack (not IPV6_V6ONLY)       also ``127.0.0.1:P`` -> VM ``127.0.0.1:P``
``::ffff:0.0.0.0``, ``::ffff:127.0.0.1``  ``127.0.0.1:P`` -> VM ``127.0.0.1:P``
any other address                         nothing
========================================  ==========================================

Host and VM sides use the loopback address of the same family, so the VM sees a
loopback client (as WSL's relay makes it), and a dual-stack socket is reached at host
``127.0.0.1`` too (WSL's issue 4851).  Only loopback on the host: a VM's loopback
service is never exposed on another host address.

A host port (protocol, family, port) is served for one VM: the first to claim it.  Each
claim gets a sequence number when it is first seen, and a claim keeps its number while
the VM keeps wanting the key, so the holder stays the holder; when it lets go, the
oldest remaining claim wins.  The others are reported as conflicts.  A static port
proxy (``hnsctl portproxy``) listening on the same port of the same family, on every
address or on loopback, is configuration and wins over forwarding: the port is
*reserved* and every claim on it is a conflict.

The ephemeral cap (as WSL caps the guest's share): every host port the daemon holds for
a VM is a port the host cannot use for its own outgoing connections, so of the ports
inside the host's ``ip_local_port_range`` at most half are held, per protocol (TCP and
UDP have separate port spaces; the IPv4 and IPv6 keys of one port count once).  The
ports of the oldest claims are held; every claim on the others is a conflict ("over the
ephemeral cap").  Ports outside the range are not counted.  :func:`over_cap` is shared
with mirrored networks (:mod:`hns.daemon.mirror_plan`).
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hns.daemon.netsh import PortProxy
from portproxy.addresses import endpoint
from portproxy.tracker import DiagSocket

__all__ = ["Claims", "ForwardKey", "Plan", "cap_reason", "changes", "ephemeral_cap",
           "kernel_keys", "keys_of", "over_cap", "plan", "reserved_by", "wanted_keys"]

PortRange = tuple[int, int]

_V4_SERVED = frozenset({ipaddress.IPv4Address("0.0.0.0"), ipaddress.IPv4Address("127.0.0.1")})
_V6_SERVED = frozenset({ipaddress.IPv6Address("::"), ipaddress.IPv6Address("::1")})
_ANY6 = ipaddress.IPv6Address("::")


@dataclass(frozen=True, order=True)
class ForwardKey:
    """A host loopback port: protocol ("tcp"/"udp"), family (4/6), port."""

    protocol: str
    family: int
    port: int

    @property
    def loopback(self) -> str:
        """The loopback address of the family: the host listens there, the relay dials the
        same address inside the VM."""
        return "127.0.0.1" if self.family == 4 else "::1"

    @property
    def socket_family(self) -> int:
        return socket.AF_INET if self.family == 4 else socket.AF_INET6

    def endpoint(self) -> str:
        return endpoint(self.loopback, self.port)


def keys_of(sock: DiagSocket) -> frozenset[ForwardKey]:
    """The host ports a VM socket asks for (see the table in the module docstring)."""
    try:
        address = ipaddress.ip_address(sock.address.split("%", 1)[0])
    except ValueError:
        return frozenset()
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    families: tuple[int, ...]
    if isinstance(address, ipaddress.IPv4Address):
        families = (4,) if address in _V4_SERVED else ()
    elif address not in _V6_SERVED:
        families = ()
    elif address == _ANY6 and not sock.v6only:
        families = (6, 4)
    else:
        families = (6,)
    return frozenset(ForwardKey(sock.protocol, f, sock.port) for f in families)


def wanted_keys(sockets: Iterable[DiagSocket]) -> frozenset[ForwardKey]:
    """Every host port a VM's listening sockets ask for."""
    keys: set[ForwardKey] = set()
    for sock in sockets:
        keys |= keys_of(sock)
    return frozenset(keys)


def kernel_keys(sockets: Iterable[DiagSocket]) -> frozenset[ForwardKey]:
    """The IPv4 host ports whose VM socket listens on every address, so that the VM's own
    address reaches it: those the kernel can forward (docs/datapath.md).  A socket on
    the VM's loopback only, and every IPv6 port, stay on the relay."""
    keys: set[ForwardKey] = set()
    for sock in sockets:
        try:
            address = ipaddress.ip_address(sock.address.split("%", 1)[0])
        except ValueError:
            continue
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            elif address == _ANY6 and not sock.v6only:
                address = ipaddress.IPv4Address(0)
        if address == ipaddress.IPv4Address(0):
            keys.add(ForwardKey(sock.protocol, 4, sock.port))
    return frozenset(keys)


class Claims:
    """What each VM wants, with the order in which the claims were first seen."""

    def __init__(self) -> None:
        self._seq = itertools.count(1)
        self._claims: dict[str, dict[ForwardKey, int]] = {}

    def update(self, vm: str, keys: Iterable[ForwardKey]) -> None:
        """``vm`` now wants exactly ``keys``: new ones are numbered, old ones keep theirs."""
        old = self._claims.get(vm, {})
        new = {k: old.get(k) or next(self._seq) for k in sorted(keys)}
        if new:
            self._claims[vm] = new
        else:
            self._claims.pop(vm, None)

    def remove(self, vm: str) -> None:
        self._claims.pop(vm, None)

    def of(self, vm: str) -> frozenset[ForwardKey]:
        return frozenset(self._claims.get(vm, ()))

    def snapshot(self) -> dict[str, dict[ForwardKey, int]]:
        return {vm: dict(keys) for vm, keys in self._claims.items()}


def reserved_by(proxies: Iterable[PortProxy]) -> dict[ForwardKey, str]:
    """The host ports that static port proxies hold (every address or loopback), each
    with the proxy's name."""
    reserved: dict[ForwardKey, str] = {}
    for proxy in proxies:
        address = proxy.listen_address
        if address.is_unspecified or str(address) in ("127.0.0.1", "::1"):
            key = ForwardKey(proxy.protocol, proxy.listen_family, proxy.listen_port)
            reserved.setdefault(key, proxy.name)
    return reserved


@dataclass(frozen=True)
class Plan:
    """``owners``: the VM served on each host port; ``conflicts``: (vm, key) -> why it
    is not served for that VM ("held by vm X", "reserved by portproxy ...")."""

    owners: Mapping[ForwardKey, str]
    conflicts: Mapping[tuple[str, ForwardKey], str]


def ephemeral_cap(ephemeral: PortRange) -> int:
    """How many ports of the host's ephemeral range (low, high) may be held per protocol."""
    low, high = ephemeral
    return (high - low + 1) // 2


def cap_reason(ephemeral: PortRange) -> str:
    return f"over the ephemeral cap (half of the host's {ephemeral[0]}-{ephemeral[1]})"


def over_cap(ranked: Mapping[ForwardKey, tuple[int, str]], ephemeral: PortRange | None
             ) -> frozenset[ForwardKey]:
    """The keys not to hold so that at most half the ephemeral range is held per
    protocol.  ``ranked``: each key that would be held, with its claim's (sequence
    number, vm); ports are admitted oldest claim first, a port's keys all together."""
    if ephemeral is None:
        return frozenset()
    low, high = ephemeral
    limit = ephemeral_cap(ephemeral)
    admitted: dict[str, set[int]] = {}
    over: set[ForwardKey] = set()
    for key in sorted((k for k in ranked if low <= k.port <= high),
                      key=lambda k: (ranked[k], k)):
        ports = admitted.setdefault(key.protocol, set())
        if key.port in ports:
            continue
        if len(ports) < limit:
            ports.add(key.port)
        else:
            over.add(key)
    return frozenset(over)


def plan(claims: Mapping[str, Mapping[ForwardKey, int]],
         reserved: Mapping[ForwardKey, str] | None = None,
         ephemeral: PortRange | None = None) -> Plan:
    """Each key to the claim with the lowest sequence number (ties: the VM's name),
    unless it is ``reserved`` or over the cap of the host's ``ephemeral`` port range."""
    reserved = reserved or {}
    best: dict[ForwardKey, tuple[int, str]] = {}
    for vm, keys in claims.items():
        for key, seq in keys.items():
            if key not in reserved and (key not in best or (seq, vm) < best[key]):
                best[key] = (seq, vm)
    capped = over_cap(best, ephemeral)
    owners = {key: vm for key, (_seq, vm) in sorted(best.items()) if key not in capped}

    def reason(key: ForwardKey) -> str:
        if key in reserved:
            return f"reserved by {reserved[key]}"
        if ephemeral is not None and key in capped:
            return cap_reason(ephemeral)
        return f"held by vm {owners[key]}"

    conflicts = {(vm, key): reason(key) for vm, keys in claims.items() for key in keys
                 if owners.get(key) != vm}
    return Plan(owners, conflicts)


def changes(current: Mapping[ForwardKey, str], desired: Mapping[ForwardKey, str]
            ) -> tuple[list[ForwardKey], list[ForwardKey]]:
    """(forwards to stop, forwards to start); a key whose VM changes is in both."""
    stop = sorted(k for k, vm in current.items() if desired.get(k) != vm)
    start = sorted(k for k, vm in desired.items() if current.get(k) != vm)
    return stop, start
