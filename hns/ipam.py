"""Address management, pure: subnets, addresses and MACs from what is taken.

Nothing here touches the kernel or the store; the service passes in what the host and the
store hold and commits the answer in one transaction (unique constraints guard the rest).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from hns.errors import AlreadyExists, Conflict, InvalidRequest

__all__ = [
    "DEFAULT_POOLS",
    "HYPERV_OUI",
    "SubnetChoice",
    "allocate_ip",
    "allocate_mac",
    "choose_subnet",
    "default_gateway",
    "validate_gateway",
]

DEFAULT_POOLS: tuple[IPv4Network, ...] = (
    IPv4Network("172.16.0.0/12"),
    IPv4Network("192.168.0.0/16"),
)
DEFAULT_PREFIXLEN = 20
HYPERV_OUI = "00:15:5d"


@dataclass(frozen=True)
class SubnetChoice:
    subnet: IPv4Network
    replaced: IPv4Network | None = None  # a remembered subnet that collided


def _overlaps(net: IPv4Network, taken: Sequence[IPv4Network]) -> IPv4Network | None:
    for other in taken:
        if net.overlaps(other):
            return other
    return None


def choose_subnet(taken: Iterable[IPv4Network], remembered: IPv4Network | None = None,
                  pools: Sequence[IPv4Network] = DEFAULT_POOLS,
                  prefixlen: int = DEFAULT_PREFIXLEN) -> SubnetChoice:
    """The remembered subnet if still free, else the first free /prefixlen in the pools."""
    taken = list(taken)
    if remembered is not None and _overlaps(remembered, taken) is None:
        return SubnetChoice(remembered)
    for pool in pools:
        if pool.prefixlen > prefixlen:
            continue
        for candidate in pool.subnets(new_prefix=prefixlen):
            if _overlaps(candidate, taken) is None:
                return SubnetChoice(candidate, replaced=remembered)
    pools_text = ", ".join(str(p) for p in pools)
    raise Conflict(f"no free /{prefixlen} left in {pools_text}; pass --subnet")


def check_subnet_free(subnet: IPv4Network, taken: Iterable[tuple[str, IPv4Network]]) -> None:
    """Refuse a pinned subnet overlapping something: ``taken`` pairs say what it is."""
    for what, other in taken:
        if subnet.overlaps(other):
            raise Conflict(f"subnet {subnet} overlaps {other} ({what})")


def default_gateway(subnet: IPv4Network) -> IPv4Address:
    return subnet.network_address + 1


def validate_gateway(subnet: IPv4Network, gateway: IPv4Address) -> IPv4Address:
    if gateway not in subnet:
        raise InvalidRequest(f"gateway {gateway} is outside the subnet {subnet}")
    if gateway in (subnet.network_address, subnet.broadcast_address):
        raise InvalidRequest(f"gateway {gateway} is the network or broadcast address of "
                             f"{subnet}")
    return gateway


def allocate_ip(subnet: IPv4Network, gateway: IPv4Address, taken: Iterable[IPv4Address],
                requested: IPv4Address | None = None) -> IPv4Address:
    """The requested address if usable, else the lowest free host address."""
    used = set(taken)
    reserved = {subnet.network_address, subnet.broadcast_address, gateway}
    if requested is not None:
        if requested not in subnet:
            raise InvalidRequest(f"address {requested} is outside the subnet {subnet}")
        if requested in reserved:
            raise InvalidRequest(f"address {requested} is reserved in {subnet} "
                                 "(network, gateway or broadcast)")
        if requested in used:
            raise AlreadyExists(f"address {requested} is already in use")
        return requested
    first = int(subnet.network_address) + 1
    last = int(subnet.broadcast_address) - 1
    for value in range(first, last + 1):
        addr = IPv4Address(value)
        if addr not in used and addr not in reserved:
            return addr
    raise Conflict(f"subnet {subnet} has no free address left")


def random_mac(rng: random.Random) -> str:
    tail = rng.getrandbits(24)
    return f"{HYPERV_OUI}:{tail >> 16:02x}:{(tail >> 8) & 0xff:02x}:{tail & 0xff:02x}"


def allocate_mac(taken: Iterable[str], requested: str | None = None,
                 rng: random.Random | None = None) -> str:
    """The requested MAC if free, else a random free one in the Hyper-V OUI."""
    used = set(taken)
    if requested is not None:
        if requested in used:
            raise AlreadyExists(f"MAC address {requested} is already in use")
        return requested
    rng = rng or random.SystemRandom()
    for _ in range(1000):
        mac = random_mac(rng)
        if mac not in used:
            return mac
    raise Conflict("no free MAC address found in the Hyper-V range")
