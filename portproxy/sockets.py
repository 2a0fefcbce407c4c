"""The one opener of listening sockets: what every relay, forward and proxy binds.

TCP listeners set ``SO_REUSEADDR`` (a TIME_WAIT left by an earlier listener on the port
must not block it); UDP sockets never do (with it, a second socket of another program
could bind the same port and take part of the datagrams).  IPv6 sockets are v6-only
unless asked: the IPv4 side of a port is its own socket.
"""

from __future__ import annotations

import socket

__all__ = ["listen"]

BACKLOG = 4096


def listen(family: int, kind: int, address: str, port: int, *, v6only: bool = True,
           device: str = "") -> socket.socket:
    """A non-blocking socket bound to ``address``:``port``, listening if TCP (``kind``
    SOCK_STREAM); ``device``: bound to that interface first (SO_BINDTODEVICE).  OSError
    if it cannot be made; nothing is left open then."""
    sock = socket.socket(family, kind | socket.SOCK_CLOEXEC)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        sock.bind((address, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
