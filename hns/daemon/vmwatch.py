"""One watched VM namespace: its socket tracker and its dialer, opened and reopened; and
:class:`NetnsSockets`, the seam through which the daemon's components reach sockets
inside namespaces.

Shared by localhost forwarding (:mod:`hns.daemon.forwarder`) and mirrored networks
(:mod:`hns.daemon.mirror`), both on the engine thread.  A namespace that cannot be opened
(not made yet, gone) is tried again every ``full_interval``, when an open one is also
checked for having been replaced under the same name (``restore`` after a reboot), by
inode.  The first failure of each kind is logged.

The components make their trackers, dialers and loopback listeners through a
:class:`NetnsSockets` (the real one by default); unit tests hand them one whose
trackers report the sockets a test says and whose "namespaces" are loopback addresses.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Protocol

from hns.daemon.forward_plan import ForwardKey
from hns.errors import HnsError
from hns.model import Vm
from hns.netns import NAMESPACES, run_in_netns
from portproxy.sockets import listen
from portproxy.tracker import DiagSocket, VmTracker
from portproxy.vmdial import DEFAULT_POOL_SIZE, VmDialer

__all__ = ["Dialer", "NetnsSockets", "Tracker", "VmWatch", "open_loopback"]

log = logging.getLogger("hns.daemon")

Soon = Callable[[Callable[[], object]], None]
Address = tuple[str, int]


class Tracker(Protocol):
    """What a component reads of a namespace's sockets (:class:`VmTracker`)."""

    sockets: frozenset[DiagSocket]
    connected_ports: dict[int, int]
    track_connected: bool

    def open(self) -> None: ...

    def poll(self, now: float) -> bool: ...

    def replaced(self) -> bool: ...

    def close(self) -> None: ...


class Dialer(Protocol):
    """Sockets dialed inside a namespace (:class:`VmDialer`), engine thread only."""

    def tcp(self, address: Address) -> socket.socket: ...

    def udp(self, address: Address) -> socket.socket: ...

    def close(self) -> None: ...


def open_loopback(key: ForwardKey) -> socket.socket:
    """A loopback end for ``key``: non-blocking, listening (TCP) or bound (UDP)."""
    kind = socket.SOCK_STREAM if key.protocol == "tcp" else socket.SOCK_DGRAM
    return listen(key.socket_family, kind, key.loopback, key.port)


class NetnsSockets:
    """Trackers, dialers and loopback listeners of namespaces, by :mod:`hns.netns`."""

    def tracker(self, netns: str | None, full_interval: float) -> Tracker:
        return VmTracker(netns, NAMESPACES, full_interval=full_interval)

    def dialer(self, netns: str, soon: Soon, pool_size: int) -> Dialer:
        return VmDialer(netns, soon, NAMESPACES, pool_size)

    def loopback(self, netns: str | None, key: ForwardKey) -> socket.socket:
        """:func:`open_loopback` inside ``netns`` (None: the daemon's own)."""
        if netns is None:
            return open_loopback(key)
        try:
            return run_in_netns(netns, open_loopback, key)
        except HnsError as exc:         # the namespace is gone: as a socket error
            raise OSError(str(exc)) from exc


REAL_SOCKETS = NetnsSockets()


class VmWatch:
    """The tracker and dialer of one VM; :meth:`poll` says when its sockets may have
    changed (then ``ready`` says whether ``tracker.sockets`` is to be believed)."""

    def __init__(self, vm: Vm, call_soon_threadsafe: Soon, *, full_interval: float,
                 pool_size: int = DEFAULT_POOL_SIZE,
                 sockets: NetnsSockets = REAL_SOCKETS) -> None:
        self.vm = vm
        self.full_interval = full_interval
        self.pool_size = pool_size
        self._soon = call_soon_threadsafe
        self._sockets = sockets
        self.tracker = sockets.tracker(vm.netns, full_interval)
        self.dialer = sockets.dialer(vm.netns, call_soon_threadsafe, pool_size)
        self.ready = False
        self.error: str | None = None
        self.next_check = 0.0

    def open(self, now: float) -> bool:
        """Start tracking the namespace; False (and tried again later) if it cannot."""
        self.next_check = now + self.full_interval
        try:
            self.tracker.open()
            self.tracker.poll(now)
        except (OSError, HnsError) as exc:
            self.tracker.close()
            self._failed(str(exc))
            return False
        self.ready, self.error = True, None
        log.debug("vm %s: watching %s", self.vm.name, self.vm.netns)
        return True

    def reset(self, reason: str) -> None:
        """Forget what the VM had; it is opened again at its next check."""
        self.close()
        self.tracker = self._sockets.tracker(self.vm.netns, self.full_interval)
        self.dialer = self._sockets.dialer(self.vm.netns, self._soon, self.pool_size)
        self.ready = False
        self._failed(reason)

    def poll(self, now: float) -> bool:
        """Poll the tracker (and open or check the namespace when due); True when the
        VM's sockets may have changed, ``ready`` or not."""
        if now >= self.next_check:
            if not self.ready:
                return self.open(now)
            self.next_check = now + self.full_interval
            if self.tracker.replaced():
                self.reset(f"namespace {self.vm.netns} is gone or was replaced")
                return True
        if not self.ready:
            return False
        try:
            return self.tracker.poll(now)
        except OSError as exc:
            self.reset(str(exc))
            return True

    def close(self) -> None:
        self.tracker.close()
        self.dialer.close()

    def _failed(self, reason: str) -> None:
        if self.error != reason:
            log.warning("vm %s: cannot watch its sockets: %s (retrying)", self.vm.name, reason)
        self.error = reason
