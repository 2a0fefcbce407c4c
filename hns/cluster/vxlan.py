"""The VXLAN device of an overlay network and its static entries (pyroute2).

Each function runs in the calling thread's namespace: callers run them on the host
namespace's thread (``Kernel.run``) or from the daemon, which lives there.  The device
has learning off and ARP proxy on: it answers the VMs' ARP requests from its neighbour
entries, and with no all-zero FDB entry nothing is flooded to other hosts, so the only
frames that leave are unicast to an FDB entry's VTEP.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hns.cluster.records import VXLAN_PORT
from hns.cluster.view import Entries, Plan
from hns.errors import KernelError
from hns.kernel import _netlink

__all__ = ["apply_plan", "ensure_vxlan", "read_entries", "underlay_for"]

NTF_SELF = 0x02
NUD_PERMANENT = 0x80


def _index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def ensure_vxlan(name: str, vni: int, local: IPv4Address, mtu: int, bridge: str,
                 alias: str) -> bool:
    """The device, a port of ``bridge``, up; True if it was made.  A device of the same
    name with another VNI or VTEP is made again."""
    with IPRoute() as ipr, _netlink(f"cannot set up VXLAN device {name}"):
        index = _index(ipr, name)
        if index is not None and _settings(ipr, index) != (vni, str(local)):
            ipr.link("del", index=index)
            index = None
        created = index is None
        if index is None:
            ipr.link("add", ifname=name, kind="vxlan", vxlan_id=vni, vxlan_local=str(local),
                     vxlan_port=VXLAN_PORT, vxlan_learning=0, vxlan_proxy=1, mtu=mtu)
            index = _index(ipr, name)
        master = _index(ipr, bridge)
        if master is None:
            raise KernelError(f"cannot set up VXLAN device {name}: bridge {bridge} is gone",
                              errno.ENODEV)
        ipr.link("set", index=index, master=master, mtu=mtu, ifalias=alias)
        ipr.link("set", index=index, state="up")
        return created


def _settings(ipr: Any, index: int) -> tuple[int, str] | None:
    info = ipr.link("get", index=index)[0].get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
        return None
    data = info.get_attr("IFLA_INFO_DATA")
    return int(data.get_attr("IFLA_VXLAN_ID")), str(data.get_attr("IFLA_VXLAN_LOCAL"))


def read_entries(name: str) -> Entries | None:
    """The device's static remote entries (None: no such device)."""
    with IPRoute() as ipr, _netlink(f"cannot read VXLAN device {name}"):
        index = _index(ipr, name)
        if index is None:
            return None
        fdb = set()
        for msg in ipr.fdb("dump", ifindex=index):
            dst, mac = msg.get_attr("NDA_DST"), msg.get_attr("NDA_LLADDR")
            if msg["ifindex"] == index and msg["flags"] & NTF_SELF and dst and mac and \
                    mac != "00:00:00:00:00:00":
                fdb.add((str(mac), IPv4Address(dst)))
        neigh = set()
        for msg in ipr.neigh("dump", ifindex=index, family=socket.AF_INET):
            dst, mac = msg.get_attr("NDA_DST"), msg.get_attr("NDA_LLADDR")
            if msg["ifindex"] == index and dst and mac:
                neigh.add((IPv4Address(dst), str(mac)))
        return Entries(frozenset(fdb), frozenset(neigh))


def apply_plan(name: str, plan: Plan) -> None:
    """Removals first, then additions (``replace``: an entry that moved is rewritten)."""
    if plan.empty:
        return
    with IPRoute() as ipr, _netlink(f"cannot program VXLAN device {name}"):
        index = _index(ipr, name)
        if index is None:
            raise KernelError(f"cannot program VXLAN device {name}: it is gone", errno.ENODEV)
        for ip, mac in plan.remove_neigh:
            with _gone():
                ipr.neigh("del", ifindex=index, dst=str(ip), lladdr=mac)
        for mac, vtep in plan.remove_fdb:
            with _gone():
                ipr.fdb("del", ifindex=index, lladdr=mac, dst=str(vtep), flags=NTF_SELF)
        for mac, vtep in plan.add_fdb:
            ipr.fdb("replace", ifindex=index, lladdr=mac, dst=str(vtep), flags=NTF_SELF,
                    state=NUD_PERMANENT)
        for ip, mac in plan.add_neigh:
            ipr.neigh("replace", ifindex=index, dst=str(ip), lladdr=mac, state=NUD_PERMANENT)


@contextmanager
def _gone() -> Iterator[None]:
    try:
        yield
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.ESRCH):
            raise


def underlay_for(target: IPv4Address) -> tuple[IPv4Address, int] | None:
    """The source address this namespace would use towards ``target`` and the MTU of
    the interface it would leave by (None: no route)."""
    with IPRoute() as ipr:
        try:
            route = ipr.route("get", dst=str(target))[0]
        except NetlinkError:
            return None
        source = route.get_attr("RTA_PREFSRC")
        if not source:
            return None
        # the interface that holds the address (a route to this host's own address
        # leaves by lo, whose MTU says nothing of the underlay)
        owner = [a["index"] for a in ipr.get_addr(family=socket.AF_INET)
                 if a.get_attr("IFA_ADDRESS") == source]
        mtu = 1500
        with contextlib.suppress(NetlinkError, IndexError):
            mtu = int(ipr.link("get", index=owner[0])[0].get_attr("IFLA_MTU"))
        return IPv4Address(source), mtu
