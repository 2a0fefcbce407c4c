"""What every relay of the engine has: a name, addresses, counters, a snapshot."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["Address", "Relay", "RelayInfo", "family_of"]

Address = tuple[str, int]
PROTOCOLS = ("tcp", "udp")


def family_of(host: str) -> socket.AddressFamily:
    """AF_INET or AF_INET6 for a literal IP address; ValueError for anything else."""
    try:
        version = ipaddress.ip_address(host.split("%", 1)[0]).version
    except ValueError:
        raise ValueError(f"not an IP address: {host!r}") from None
    return socket.AF_INET6 if version == 6 else socket.AF_INET


def check_address(address: tuple[Any, ...]) -> Address:
    """``(host, port)`` with a literal IP and a port in 1..65535, else ValueError."""
    if not isinstance(address, tuple) or len(address) < 2:
        raise ValueError(f"address must be (host, port), not {address!r}")
    host, port = address[0], address[1]
    if not isinstance(host, str) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"bad address {address!r}")
    family_of(host)
    return host, port


@dataclass(frozen=True)
class RelayInfo:
    """A snapshot of one relay.

    ``connections`` counts live TCP connections or UDP flows; ``accepted`` every one
    since the start; ``errors`` the targets that refused, were unreachable or timed out
    (TCP) or datagrams that could not be passed on (UDP), and local failures; ``resets``
    the TCP connections that ended with a reset from either side.  ``max_connections``
    is the cap on live connections or flows (0: none), ``idle_timeout`` the seconds after
    which an idle one is closed (0: never); ``refused`` counts the TCP connections
    closed at once because the relay was full, ``idle_closed`` those closed for being
    idle, ``loops`` those cut because they were the relay's own connection coming back.
    """

    name: str
    protocol: str
    listen: Address
    connect: Address
    connections: int
    accepted: int
    errors: int
    resets: int = 0
    max_connections: int = 0
    idle_timeout: float = 0.0
    refused: int = 0
    idle_closed: int = 0
    loops: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    timeouts: int = 0
    unreachable: int = 0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, not {self.protocol!r}")
        for counter in ("connections", "accepted", "errors", "resets", "max_connections",
                        "idle_timeout", "refused", "idle_closed", "loops", "bytes_up",
                        "bytes_down", "timeouts", "unreachable"):
            if getattr(self, counter) < 0:
                raise ValueError(f"{counter} must not be negative")


class Relay:
    """A listening socket of the engine and what it relays to.  Made by ``Engine.add_*``."""

    protocol: ClassVar[str] = ""

    def __init__(self, name: str, listen: Address, connect: Address) -> None:
        self.name = name
        self.listen = listen
        self.connect = connect
        self.accepted = 0
        self.errors = 0
        self.resets = 0
        self.max_connections = 0       # 0: no cap
        self.idle_timeout = 0.0        # 0: never
        self.refused = 0
        self.idle_closed = 0
        self.loops = 0
        self.bytes_up = 0              # of ended connections (TCP) or every datagram (UDP)
        self.bytes_down = 0
        self.timeouts = 0
        self.unreachable = 0

    def live(self) -> int:
        """Live connections or flows."""
        raise NotImplementedError

    def start(self) -> None:
        """Register with the engine (engine thread)."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the listening socket and everything relayed (engine thread)."""
        raise NotImplementedError

    def moved(self) -> tuple[int, int]:
        """Bytes moved up and down so far, live connections included."""
        return self.bytes_up, self.bytes_down

    def info(self) -> RelayInfo:
        up, down = self.moved()
        return RelayInfo(self.name, self.protocol, self.listen, self.connect, self.live(),
                         self.accepted, self.errors, self.resets, self.max_connections,
                         self.idle_timeout, self.refused, self.idle_closed, self.loops,
                         up, down, self.timeouts, self.unreachable)

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name!r} {self.listen[0]}:{self.listen[1]} -> "
                f"{self.connect[0]}:{self.connect[1]}>")
