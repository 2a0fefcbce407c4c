"""What the healer reads inside a VM namespace: whether eth0 still has what
:func:`hns.kernel.configure_vm_side` gave it (up, its address, the default route via the
gateway).

Cheap on purpose (the daemon looks inside every VM once a minute): on a short-lived
thread inside the namespace, three ``ioctl``\\ s on a datagram socket (the interface's
flags, primary address and netmask) and the thread's own ``/proc/thread-self/net/route``
-- no netlink socket to open and no dump to parse (about 1.7 ms a VM, mostly the thread
entering the namespace, against about 9 ms with pyroute2).
"""

from __future__ import annotations

import fcntl
import socket
import struct
from ipaddress import IPv4Address

from hns.errors import KernelError
from hns.netns import run_in_netns

__all__ = ["default_gateways", "vm_side_ok"]

SIOCGIFFLAGS = 0x8913
SIOCGIFADDR = 0x8915
SIOCGIFNETMASK = 0x891B
IFF_UP = 0x1
ROUTES = "/proc/thread-self/net/route"


def default_gateways(route_text: str, ifname: str) -> set[IPv4Address]:
    """The gateways of the default routes through ``ifname`` in ``/proc/net/route``
    text (addresses in little-endian hex there); pure."""
    found = set()
    for line in route_text.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[0] == ifname and fields[1] == "00000000" and \
                fields[7] == "00000000":
            found.add(IPv4Address(struct.pack("<I", int(fields[2], 16))))
    return found


def _eth0(ip: IPv4Address, prefixlen: int, gateway: IPv4Address) -> bool:
    request = struct.pack("16s16x", b"eth0")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            flags = struct.unpack_from("H", fcntl.ioctl(sock, SIOCGIFFLAGS, request), 16)[0]
            address = fcntl.ioctl(sock, SIOCGIFADDR, request)[20:24]
            mask = fcntl.ioctl(sock, SIOCGIFNETMASK, request)[20:24]
        with open(ROUTES) as f:
            routes = f.read()
    except OSError:                 # no eth0, or no IPv4 address on it
        return False
    return (bool(flags & IFF_UP) and IPv4Address(address) == ip
            and sum(bin(b).count("1") for b in mask) == prefixlen
            and gateway in default_gateways(routes, "eth0"))


def vm_side_ok(netns: str, ip: IPv4Address, prefixlen: int, gateway: IPv4Address) -> bool:
    """True when the VM's eth0 is up with ``ip/prefixlen`` and a default route via
    ``gateway``; False when anything of it is missing (or the namespace is gone)."""
    try:
        return run_in_netns(netns, _eth0, ip, prefixlen, gateway)
    except (OSError, KernelError):
        return False
