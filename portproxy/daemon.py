"""The hns daemon: one process, one event loop, serving the static port proxies.

Theory of operation: at start the daemon moves its main thread into the host namespace
(before any other thread exists, so every thread and socket it makes later is there),
opens the control socket, and reconciles: every configured proxy gets a listening socket
handed to the relay engine.  A proxy whose socket cannot be opened (address in use, an
address not yet on the host) is kept with its error, shown by ``hnsctl status``, and
retried every ``retry_interval`` seconds.  Changes in the state are noticed through
SQLite's ``data_version`` (polled once a second: one cheap pragma) or at once when the
CLI sends ``reload`` over the control socket.  SIGTERM/SIGINT stop the loop; the
listening sockets close with it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from hns.netns import enter_netns
from hns.store import Store
from portproxy.config import ProxyConfig
from portproxy.control import control_path, relay_status, request
from portproxy.engine import Engine
from portproxy.netsh import PortProxy, ProxyKey

__all__ = ["Daemon", "open_listener", "sd_notify"]

log = logging.getLogger("hns.daemon")

MAX_REQUEST = 64 * 1024


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state, if it is listening."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, \
            contextlib.suppress(OSError):
        sock.sendto(message.encode(), address)


def open_listener(proxy: PortProxy) -> socket.socket:
    """The listening (TCP) or bound (UDP) socket of a proxy, non-blocking."""
    family = socket.AF_INET if proxy.listen_family == 4 else socket.AF_INET6
    kind = socket.SOCK_STREAM if proxy.protocol == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((str(proxy.listen_address), proxy.listen_port))
        if kind == socket.SOCK_STREAM:
            sock.listen(4096)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class _Served:
    proxy: PortProxy
    relay: Any = None
    error: str | None = None
    retry: Any = field(default=None, repr=False)


class Daemon:
    """The daemon of one hns instance (state dir + host namespace)."""

    def __init__(self, store: Store, host_netns: str | None, *, retry_interval: float = 2.0,
                 poll_interval: float = 1.0) -> None:
        self.store = store
        self.host_netns = host_netns
        self.retry_interval = retry_interval
        self.poll_interval = poll_interval
        self.engine = Engine()
        self.config = ProxyConfig(store)
        self._served: dict[ProxyKey, _Served] = {}
        self._version = -1
        self._control: socket.socket | None = None

    # lifecycle

    def run(self) -> int:
        if self.host_netns:
            if threading.active_count() != 1:
                raise RuntimeError("the daemon must enter the host namespace before threads")
            enter_netns(self.host_netns)
        self._open_control()
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.reconcile()
            self.engine.call_later(self.poll_interval, self._poll)
            sd_notify("READY=1")
            log.info("daemon ready: %d port proxies", len(self._served))
            self.engine.run()
        finally:
            sd_notify("STOPPING=1")
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for key in list(self._served):
                self._stop(key)
            self._close_control()
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        log.info("signal %d: stopping", signum)
        self.engine.stop()

    # proxies

    def reconcile(self) -> None:
        """Make the served proxies what the state says."""
        self._version = self.config.data_version()
        desired = {p.key: p for p in self.config.list()}
        for key, served in list(self._served.items()):
            if desired.get(key) != served.proxy:
                self._stop(key)
        for key, proxy in desired.items():
            if key not in self._served:
                self._served[key] = _Served(proxy)
                self._start(key)

    def _start(self, key: ProxyKey) -> None:
        served = self._served.get(key)
        if served is None or served.relay is not None:
            return
        served.retry = None
        proxy = served.proxy
        try:
            sock = open_listener(proxy)
        except OSError as exc:
            message = os.strerror(exc.errno) if exc.errno else str(exc)
            if served.error != message:
                log.warning("%s: cannot listen: %s (retrying every %gs)", proxy.name, message,
                            self.retry_interval)
            served.error = message
            served.retry = self.engine.call_later(self.retry_interval, lambda: self._start(key))
            return
        target = (str(proxy.connect_address), proxy.connect_port)
        add = self.engine.add_tcp if proxy.protocol == "tcp" else self.engine.add_udp
        served.relay = add(sock, target, name=proxy.name)
        served.error = None
        log.info("%s -> %s:%d", proxy.name, *target)

    def _stop(self, key: ProxyKey) -> None:
        served = self._served.pop(key)
        if served.retry is not None:
            served.retry.cancel()
        if served.relay is not None:
            self.engine.remove(served.relay)

    def _poll(self) -> None:
        try:
            if self.config.data_version() != self._version:
                self.reconcile()
        except Exception:  # a locked or broken database must not stop the relays
            log.exception("cannot read the state")
        self.engine.call_later(self.poll_interval, self._poll)

    # control socket

    def _open_control(self) -> None:
        path = control_path(self.store.state_dir)
        with contextlib.suppress(FileNotFoundError):
            if request(self.store.state_dir, "status", timeout=1.0) is not None:
                raise RuntimeError(f"a daemon already serves {self.store.state_dir}")
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        self._control = sock
        self.engine.add_reader(sock.fileno(), self._accept)

    def _close_control(self) -> None:
        if self._control is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.engine.remove_reader(self._control.fileno())
            self._control.close()
            self._control = None
            with contextlib.suppress(FileNotFoundError):
                control_path(self.store.state_dir).unlink()

    def _accept(self) -> None:
        assert self._control is not None
        try:
            conn, _ = self._control.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        buf = bytearray()
        self.engine.add_reader(conn.fileno(), lambda: self._on_request(conn, buf))

    def _on_request(self, conn: socket.socket, buf: bytearray) -> None:
        try:
            chunk = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        buf += chunk
        if chunk and b"\n" not in buf and len(buf) < MAX_REQUEST:
            return
        self.engine.remove_reader(conn.fileno())
        try:
            answer = self._answer(bytes(buf))
            conn.setblocking(True)
            conn.settimeout(1.0)
            conn.sendall(json.dumps(answer).encode() + b"\n")
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, None):
                log.warning("control socket: %s", exc)
        finally:
            conn.close()

    def _answer(self, data: bytes) -> dict[str, Any]:
        try:
            command = json.loads(data).get("command")
        except (ValueError, AttributeError):
            return {"Error": "bad request"}
        if command == "reload":
            self.reconcile()
            return {"Ok": True}
        if command == "status":
            return self.status()
        return {"Error": f"unknown command {command!r}"}

    def status(self) -> dict[str, Any]:
        infos = {info.name: info for info in self.engine.relays()}
        relays = []
        for served in sorted(self._served.values(), key=lambda s: s.proxy.key):
            info = infos.get(served.proxy.name)
            relays.append(relay_status(served.proxy, info, served.error))
        return {"Running": True, "Pid": os.getpid(), "HostNetns": self.host_netns,
                "Relays": relays}
