"""What the healer reads inside a VM namespace: whether eth0 still has what
:func:`hns.kernel.configure_vm_side` gave it (up, its address, the default route via the
gateway).  One netlink socket per call, on a short-lived thread inside the namespace."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hns.errors import KernelError
from hns.netns import run_in_netns

__all__ = ["vm_side_ok"]

IFF_UP = 0x1


def _ok(ipr: Any, ip: IPv4Address, prefixlen: int, gateway: IPv4Address) -> bool:
    links = ipr.link_lookup(ifname="eth0")
    if not links:
        return False
    index = links[0]
    (link,) = ipr.link("get", index=index)
    if not link["flags"] & IFF_UP:
        return False
    have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index)}
    if (str(ip), prefixlen) not in have:
        return False
    return any(r["dst_len"] == 0 and r.get_attr("RTA_GATEWAY") == str(gateway)
               for r in ipr.get_routes(family=2, table=254))


def vm_side_ok(netns: str, ip: IPv4Address, prefixlen: int, gateway: IPv4Address) -> bool:
    """True when the VM's eth0 is up with ``ip/prefixlen`` and a default route via
    ``gateway``; False when anything of it is missing (or the namespace is gone)."""
    def check() -> bool:
        with IPRoute() as ipr:
            return _ok(ipr, ip, prefixlen, gateway)
    try:
        return run_in_netns(netns, check)
    except (NetlinkError, OSError, KernelError):
        return False
