"""Readiness polling for tests: :func:`wait_until` a condition, :func:`wait_port` a port.

Both raise :class:`TimeoutError` with a message naming what was awaited and, for ports,
the last error seen, so a failing test says what it was waiting for.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["wait_port", "wait_until"]

T = TypeVar("T")
ATTEMPT_TIMEOUT = 1.0          # s, one connect attempt at most
UDP_SILENCE = 0.2              # s without an ICMP error: the UDP port is taken to be open
ICMP_RATE = 1.05               # s: Linux sends a peer one port unreachable a second (after
                               # a burst of 6): silence sooner after a refusal proves nothing


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
               what: str = "the condition") -> T:
    """Call ``predicate()`` every ``interval`` seconds until it returns something true,
    and return that; after ``timeout`` seconds raise ``TimeoutError("timed out after
    T s waiting for WHAT")``.  Exceptions of ``predicate`` propagate."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _netns_of(peer_or_netns: Any) -> str | None:
    if peer_or_netns is None or isinstance(peer_or_netns, str):
        return peer_or_netns
    netns = getattr(peer_or_netns, "netns", None)
    if not isinstance(netns, str):
        raise TypeError(f"wait_port: not a Peer, a SandboxVm or a namespace name: "
                        f"{peer_or_netns!r}")
    return netns


def _try_tcp(family: int, host: str, port: int, timeout: float) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))


def _try_udp(family: int, host: str, port: int, timeout: float) -> None:
    """An empty datagram; an ICMP port unreachable comes back as ECONNREFUSED."""
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(min(timeout, UDP_SILENCE))
        sock.connect((host, port))
        sock.send(b"")
        try:
            sock.recv(1)
        except TimeoutError:
            return                      # no refusal: something listens (or drops)


def wait_port(peer_or_netns: Any, host: str, port: int, timeout: float = 10.0,
              protocol: str = "tcp") -> None:
    """Try to connect to ``host:port`` from inside a namespace (a :class:`Peer`, a
    :class:`SandboxVm` or a namespace name; None: this process's own) until an attempt
    succeeds.  TCP: a completed handshake.  UDP: an empty datagram that draws no ICMP
    port unreachable within 0.2 s (after a refusal, only once a second has passed: the
    kernel rate-limits those ICMP errors).  ``TimeoutError`` after ``timeout`` seconds."""
    from hns.netns import NetnsExecutor
    protocol = protocol.lower()
    if protocol not in ("tcp", "udp"):
        raise ValueError(f"wait_port: protocol {protocol!r}: use tcp or udp")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    attempt = _try_tcp if protocol == "tcp" else _try_udp
    netns = _netns_of(peer_or_netns)
    deadline = time.monotonic() + timeout
    last = "no attempt made"
    refused_at: float | None = None
    with NetnsExecutor(netns) as ex:
        while True:
            left = max(0.05, min(ATTEMPT_TIMEOUT, deadline - time.monotonic()))
            try:
                ex.call(attempt, family, host, port, left)
                if protocol == "tcp" or refused_at is None or \
                        time.monotonic() - refused_at >= ICMP_RATE + UDP_SILENCE:
                    return
                # silence so soon after a refusal: the refusal stays the last word
                time.sleep(max(0.0, refused_at + ICMP_RATE - time.monotonic()))
            except OSError as exc:
                last = _describe(exc)
                if isinstance(exc, ConnectionRefusedError):
                    refused_at = time.monotonic()
            if time.monotonic() >= deadline:
                where = f"netns {netns}" if netns else "this namespace"
                raise TimeoutError(f"{protocol} {host}:{port} not reachable from {where} "
                                   f"within {timeout:g} s (last attempt: {last})")
            time.sleep(0.05)


def _describe(exc: OSError) -> str:
    if isinstance(exc, TimeoutError) or exc.errno is None:
        return str(exc) or type(exc).__name__
    return f"{errno.errorcode.get(exc.errno, exc.errno)} ({exc.strerror})"
