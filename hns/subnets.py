"""Which subnet a new network gets, pure: a pinned one if free, the one remembered for
its name if still free, else the first free one of the pools (NAT: the private pools of
:mod:`hns.ipam`; mirrored: a transit /24 in 169.254.0.0/16)."""

from __future__ import annotations

import logging
from ipaddress import IPv4Network

from hns import ipam
from hns.errors import Conflict
from hns.mirrored import TRANSIT_POOL, TRANSIT_PREFIXLEN

__all__ = ["choose_network_subnet", "pick_subnet"]

log = logging.getLogger("hns")

Taken = list[tuple[str, IPv4Network]]       # (what holds it, prefix)


def pick_subnet(name: str, mirrored: bool, pinned: IPv4Network | None, others: Taken,
                host_taken: Taken, remembered: IPv4Network | None) -> IPv4Network:
    """The subnet of new network ``name``: ``others`` are the other networks',
    ``host_taken`` the host's prefixes, ``remembered`` the one the name had before."""
    if pinned is not None:
        ipam.check_subnet_free(pinned, others + host_taken)
        return pinned
    if remembered is not None and mirrored != remembered.subnet_of(TRANSIT_POOL):
        remembered = None   # the name was used for a network of the other type
    choice = choose_network_subnet(mirrored, others, host_taken, remembered)
    if choice.replaced is not None:
        log.warning("the address range %s remembered for network %s collides with "
                    "the host; created the network with range %s instead",
                    choice.replaced, name, choice.subnet)
    return choice.subnet


def choose_network_subnet(mirrored: bool, others: Taken, host_taken: Taken,
                          remembered: IPv4Network | None) -> ipam.SubnetChoice:
    """A new network's subnet: for NAT a free one of the default pools; for a mirrored
    network a transit /24.  ``others``: the other networks' subnets, ``host_taken``: the
    host's prefixes, each with what holds it."""
    if not mirrored:
        return ipam.choose_subnet([n for _, n in others + host_taken], remembered)
    # A transit /24's own route is more specific than a wider host route (the
    # link-local 169.254.0.0/16 that NetworkManager and avahi add): only the host's
    # prefixes as specific as the /24, and its own addresses, take a /24.
    taken = [n for _, n in others] + [n for _, n in host_taken
                                      if n.prefixlen >= TRANSIT_PREFIXLEN]
    try:
        return ipam.choose_subnet(taken, remembered, (TRANSIT_POOL,), TRANSIT_PREFIXLEN)
    except Conflict:
        raise Conflict(f"no free /{TRANSIT_PREFIXLEN} left in {TRANSIT_POOL} for the "
                       "transit network of a mirrored network") from None
