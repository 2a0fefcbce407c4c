"""Flushing stale UDP conntrack entries after a port mapping is added (as CNI's portmap
plugin does).

A UDP "connection" to a host port that was not mapped yet (a client retrying against a
closed port, a DNS client, a game) has a conntrack entry already; NAT is decided on a
flow's first packet only, so until that entry times out its packets keep going to the
host instead of the new mapping.  Deleting the entries whose original destination is the
mapped port fixes that.  TCP needs nothing: a new connection is a new entry.

Talks netlink (NETLINK_NETFILTER) through pyroute2, in the namespace of the calling
thread: call :func:`flush_udp` on a thread inside the host namespace
(``HostKernel.run``).  pyroute2 is imported on first use.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterable
from ipaddress import IPv4Address

from nat.errors import NatError

__all__ = ["flush_udp"]


def flush_udp(ports: Iterable[tuple[int, IPv4Address | None]]) -> int:
    """Delete IPv4 UDP entries whose original destination is one of ``ports`` (a port on
    one address, or on any address when None); how many were deleted."""
    from pyroute2 import Conntrack
    from pyroute2.netlink.exceptions import NetlinkError

    wanted = {(port, str(addr) if addr else None) for port, addr in ports}
    if not wanted:
        return 0
    numbers = {port for port, _ in wanted}
    deleted = 0
    try:
        with Conntrack() as ct:
            # the whole dump first: pyroute2's sync wrapper cannot interleave requests
            stale = [e for e in ct.dump_entries()
                     if e.tuple_orig.proto == socket.IPPROTO_UDP
                     and e.tuple_orig.dport in numbers
                     and ((e.tuple_orig.dport, None) in wanted
                          or (e.tuple_orig.dport, e.tuple_orig.daddr) in wanted)]
            for entry in stale:
                try:
                    ct.delete(entry)
                    deleted += 1
                except NetlinkError as exc:
                    if exc.code != errno.ENOENT:  # gone meanwhile: fine
                        raise
    except NetlinkError as exc:
        code = int(exc.code) if exc.code else errno.EIO
        raise NatError(f"cannot flush conntrack entries: {os.strerror(code)}", code) from None
    except OSError as exc:
        raise NatError(f"cannot flush conntrack entries: {exc.strerror}", exc.errno) from None
    except RuntimeError as exc:  # pyroute2's event loop
        raise NatError(f"cannot flush conntrack entries: {exc}") from None
    return deleted
