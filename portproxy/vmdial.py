"""Dialing into a VM from the engine thread: sockets made inside the VM's namespace.

Theory of operation: the engine calls ``dial`` on its own thread for every relayed TCP
connection and UDP flow, and that thread never leaves the host namespace. A socket stays
in the namespace it was created in, and only creating it needs a thread inside the VM's
namespace; connecting, reading and writing work from any thread. So :class:`VmDialer`
keeps a small pool of fresh, unconnected sockets per (family, type), made by an executor
thread of the VM (:class:`~portproxy.namespaces.Namespaces`) and handed over to the
engine thread with ``call_soon_threadsafe``. A dial takes a socket from the pool (about
a microsecond) and starts its non-blocking connect; when the pool runs low a refill is
queued; when it is empty (the first dial, a burst) the dial makes the socket with a
synchronous call into the executor (about 40 us). The executor thread and the pools
exist only once a VM is dialed into; an idle VM costs nothing.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from portproxy._relay import Address
from portproxy.engine import dial_tcp, dial_udp
from portproxy.namespaces import Executor, Namespaces

__all__ = ["DEFAULT_POOL_SIZE", "VmDialer"]

log = logging.getLogger("hns.daemon")

DEFAULT_POOL_SIZE = 8

_Kind = tuple[int, int]      # (family, type)


def _make_sockets(family: int, kind: int, count: int) -> list[socket.socket]:
    """Run inside the VM namespace."""
    made: list[socket.socket] = []
    try:
        for _ in range(count):
            made.append(socket.socket(family, kind | socket.SOCK_CLOEXEC))
    except OSError:
        if not made:
            raise
    return made


class VmDialer:
    """Dials targets inside one VM namespace; ``tcp`` and ``udp`` are ``dial`` callables
    for :meth:`Engine.add_tcp` and :meth:`Engine.add_udp` (engine thread only)."""

    def __init__(self, netns: str, call_soon_threadsafe: Callable[[Callable[[], object]], None],
                 namespaces: Namespaces, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        self.netns = netns
        self.namespaces = namespaces
        self.pool_size = pool_size
        self._soon = call_soon_threadsafe
        self._executor: Executor | None = None
        self._pools: dict[_Kind, deque[socket.socket]] = {}
        self._pending: set[_Kind] = set()
        self._lock = threading.Lock()       # _closed, read by the executor's callbacks
        self._closed = False

    def tcp(self, address: Address) -> socket.socket:
        return dial_tcp(address, self._socket)

    def udp(self, address: Address) -> socket.socket:
        return dial_udp(address, self._socket)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        for pool in self._pools.values():
            while pool:
                pool.popleft().close()
        if self._executor is not None:
            self._executor.close()
            self._executor = None

    def _ex(self) -> Executor:
        if self._closed:
            raise OSError("the dialer is closed")
        if self._executor is None:
            self._executor = self.namespaces.executor(self.netns)
        return self._executor

    def _socket(self, family: int, kind: int) -> socket.socket:
        key = (family, kind)
        pool = self._pools.setdefault(key, deque())
        sock = pool.popleft() if pool else None
        if self.pool_size > 0 and len(pool) <= self.pool_size // 2:
            try:
                self._refill(key, self.pool_size - len(pool))
            except Exception as exc:
                log.debug("%s: cannot refill the socket pool: %s", self.netns, exc)
        if sock is not None:
            return sock
        try:
            return self._ex().call(socket.socket, family, kind | socket.SOCK_CLOEXEC)
        except OSError:
            raise
        except Exception as exc:     # the namespace is gone (KernelError), a broken thread
            raise OSError(f"cannot make a socket in {self.netns}: {exc}") from exc

    def _refill(self, key: _Kind, count: int) -> None:
        if key not in self._pending:
            future = self._ex().submit(_make_sockets, key[0], key[1], count)
            self._pending.add(key)
            future.add_done_callback(lambda f: self._made(key, f))

    def _made(self, key: _Kind, future: Future[list[socket.socket]]) -> None:
        """On the executor thread: hand the sockets to the engine thread."""
        try:
            made = future.result()
        except Exception as exc:
            log.debug("%s: cannot make sockets: %s", self.netns, exc)
            made = []
        with self._lock:
            if not self._closed:
                self._soon(lambda: self._fill(key, made))
                return
        for sock in made:
            sock.close()

    def _fill(self, key: _Kind, made: list[socket.socket]) -> None:
        self._pending.discard(key)
        if self._closed:
            for sock in made:
                sock.close()
            return
        self._pools.setdefault(key, deque()).extend(made)
