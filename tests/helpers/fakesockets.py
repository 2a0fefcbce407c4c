"""A :class:`hns.daemon.vmwatch.NetnsSockets` for unit tests of the daemon's components.

Every "namespace" is a loopback address of the test's own namespace: the daemon's own
(``None``) is 127.0.0.1, each other one gets 127.0.0.2, 127.0.0.3 ... as it is first
named.  Its trackers report the sockets the test puts in :attr:`FakeSockets.listening`
(they are not read from the kernel), its dialers dial that namespace's address whatever
address they are given, and its loopback listeners are real sockets on that address, so
a relay the component starts carries real bytes between real loopback servers.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from hns.daemon.forward_plan import ForwardKey
from hns.daemon.vmwatch import Dialer, NetnsSockets, Tracker
from portproxy.engine import dial_tcp, dial_udp
from portproxy.sockets import listen
from portproxy.tracker import TCP_LISTEN, DiagSocket

__all__ = ["FakeSockets", "FakeTracker", "free_port", "listener"]


def listener(port: int, protocol: str = "tcp", address: str = "0.0.0.0") -> DiagSocket:
    """A listening IPv4 socket as sock_diag would report it."""
    state = TCP_LISTEN if protocol == "tcp" else 7
    return DiagSocket(protocol, socket.AF_INET, address, port, state)


def free_port(*addresses: str) -> int:
    """A TCP port free on every one of ``addresses`` just now."""
    while True:
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port: int = probe.getsockname()[1]
        try:
            for address in addresses[1:]:
                with socket.socket() as other:
                    other.bind((address, port))
        except OSError:
            continue
        return port


class FakeTracker:
    """The sockets the test says a namespace has; ``open`` fails while it is "gone"."""

    def __init__(self, world: FakeSockets, netns: str | None) -> None:
        self.world = world
        self.netns = netns
        self.sockets: frozenset[DiagSocket] = frozenset()
        self.connected_ports: dict[int, int] = {}
        self.track_connected = False
        self.generation = world.generation.get(netns, 0)
        self.closed = False

    def open(self) -> None:
        if self.netns in self.world.gone:
            raise OSError(f"namespace {self.netns} is gone")
        self.generation = self.world.generation.get(self.netns, 0)

    def poll(self, now: float) -> bool:
        found = frozenset(self.world.listening.get(self.netns, ()))
        changed, self.sockets = found != self.sockets, found
        return changed

    def replaced(self) -> bool:
        return self.netns in self.world.gone or \
            self.world.generation.get(self.netns, 0) != self.generation

    def close(self) -> None:
        self.closed = True


class _Dialer:
    def __init__(self, address: str) -> None:
        self.address = address

    def tcp(self, address: tuple[str, int]) -> socket.socket:
        return dial_tcp((self.address, address[1]))

    def udp(self, address: tuple[str, int]) -> socket.socket:
        return dial_udp((self.address, address[1]))

    def close(self) -> None:
        pass


class FakeSockets(NetnsSockets):
    """Namespaces as loopback addresses (see the module's docstring)."""

    def __init__(self) -> None:
        self.listening: dict[str | None, list[DiagSocket]] = {}
        self.gone: set[str | None] = set()
        self.generation: dict[str | None, int] = {}   # bumped: "replaced under its name"
        self._addresses: dict[str | None, str] = {None: "127.0.0.1"}

    def address(self, netns: str | None) -> str:
        if netns not in self._addresses:
            self._addresses[netns] = f"127.0.0.{len(self._addresses) + 1}"
        return self._addresses[netns]

    def replace(self, netns: str) -> None:
        self.generation[netns] = self.generation.get(netns, 0) + 1

    def tracker(self, netns: str | None, full_interval: float) -> Tracker:
        return FakeTracker(self, netns)

    def dialer(self, netns: str, soon: Callable[[Callable[[], object]], None],
               pool_size: int) -> Dialer:
        return _Dialer(self.address(netns))

    def loopback(self, netns: str | None, key: ForwardKey) -> socket.socket:
        if netns in self.gone:
            raise OSError(f"namespace {netns} is gone")
        kind = socket.SOCK_STREAM if key.protocol == "tcp" else socket.SOCK_DGRAM
        return listen(socket.AF_INET, kind, self.address(netns), key.port)
