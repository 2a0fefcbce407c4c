"""The hns daemon: one process, one event loop, serving its components (the static port
proxies today: :mod:`hns.daemon.proxies`).

Theory of operation: at start the daemon takes the state directory's daemon lock (an
exclusive ``flock`` on ``daemon.lock``, held for its life and released by the kernel
however it ends; the holder's pid is written into the file), so one daemon serves a state
directory: a second one exits at once naming the first.  It then moves its main thread
into the host namespace (before any other thread exists, so every thread and socket it
makes later is there), opens the control socket, and reconciles each component with the
state.  Changes in the state are noticed through SQLite's ``data_version`` (polled once a
second: one cheap pragma) or at once when the CLI sends ``reload`` over the control
socket; SIGHUP does the same as ``reload``.  SIGTERM and SIGINT stop the loop; the
listening sockets close with it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from hns.cluster.config import ClusterConfig
from hns.daemon.control import control_path
from hns.daemon.dns import DnsProxy
from hns.daemon.fastpath import FastPath
from hns.daemon.forwarder import Forwarder
from hns.daemon.keeper import HEAL_INTERVAL, Keeper
from hns.daemon.metrics import MetricsServer
from hns.daemon.mirror import Mirror
from hns.daemon.netsh import DEFAULT_MAX_CONNECTIONS
from hns.daemon.portmap_counters import portmap_rows
from hns.daemon.proxies import StaticProxies
from hns.errors import HnsError
from hns.netns import enter_netns
from hns.nft import nft as hns_nft
from hns.store import Store
from portproxy.engine import Engine

__all__ = ["LOCK_FILE", "AlreadyRunning", "Component", "Daemon", "DaemonLock", "sd_notify"]

log = logging.getLogger("hns.daemon")

MAX_REQUEST = 64 * 1024
SNAPSHOT_TIMEOUT = 5.0       # s: a scrape waits this long for the engine thread
LOCK_FILE = "daemon.lock"
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class AlreadyRunning(HnsError):
    """Another daemon holds the state directory's daemon lock (exit 1)."""


class DaemonLock:
    """The exclusive lock of one state directory's daemon: an ``flock`` on
    ``<state-dir>/daemon.lock``, which holds the holder's pid.  The file is never removed
    (a daemon that unlinked it could let two others lock two different files)."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir) / LOCK_FILE
        self._fd = -1

    def acquire(self, tries: int = 50) -> None:
        """Take the lock now or raise :class:`AlreadyRunning` naming the holder.

        The holder writes its pid just after locking and empties the file just before
        it lets go, so while the lock is taken and the file empty, both are tried again
        for a little while."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            pid = self._lock_or_holder(fd, tries)
        except BaseException:
            os.close(fd)
            raise
        if pid is not None or self._fd != fd:
            os.close(fd)
            raise AlreadyRunning(f"a daemon already serves {self.path.parent} "
                                 f"(pid {pid or 'unknown'})")

    def _lock_or_holder(self, fd: int, tries: int) -> int | None:
        """Lock ``fd`` (then ``self._fd`` is it) or return the holder's pid (or None)."""
        for attempt in range(tries):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _pid_in(fd)
                if pid:
                    return pid
                if attempt + 1 < tries:
                    time.sleep(0.01)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._fd = fd
            return None
        return None

    def holder(self) -> int | None:
        """The pid in the file while another holds the lock (0: not written yet), None
        while nobody holds it."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _pid_in(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)     # closing the last fd of the file drops the flock
            self._fd = -1


def _pid_in(fd: int) -> int:
    """The pid the lock's holder wrote into the file (0: none yet)."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isascii() and text.isdigit() else 0


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


class Component(Protocol):
    """A part of the daemon: made from the state, asked for its status, closed at exit."""

    def reconcile(self) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class Daemon:
    """The daemon of one hns instance (state dir + host namespace)."""

    def __init__(self, store: Store, host_netns: str | None, *, retry_interval: float = 2.0,
                 poll_interval: float = 1.0, heal: bool = True,
                 heal_interval: float = HEAL_INTERVAL, config: str | None = None,
                 metrics: tuple[str, int] | None = None,
                 cluster: ClusterConfig | None = None, localhost_path: str = "auto") -> None:
        """``config``: the settings file a SIGHUP reads again (None: ``HNS_CONFIG`` or
        the default path); ``metrics``: where to serve Prometheus metrics (None: not);
        ``cluster``: the cluster this host is in (its agent runs; None: no cluster);
        ``localhost_path``: ``auto`` (the kernel where it can) or ``relay``."""
        self.store = store
        self.host_netns = host_netns
        self.retry_interval = retry_interval
        self.poll_interval = poll_interval
        # every relay of the daemon has a cap (static proxies: their own)
        self.engine = Engine(tcp_max_connections=DEFAULT_MAX_CONNECTIONS)
        self._nft = hns_nft(None)      # the daemon runs in the host namespace
        # first: its table goes at close before the others would delete from it one by one
        self.fast = FastPath(self.engine, store, self._nft)
        self.components: list[Component] = [self.fast, StaticProxies(
            self.engine, store, retry_interval, fast=self.fast)]
        # before the proxies: a forward gives way to a static proxy before it binds
        self.components.insert(1, Forwarder(self.engine, store, retry_interval=retry_interval,
                                            fast=self.fast, kernel=localhost_path == "auto"))
        # after the static proxies: a port they hold is the host's
        self.components.append(Mirror(self.engine, store, host_netns,
                                      retry_interval=retry_interval))
        self.components.append(DnsProxy(self.engine, store, host_netns, retry_interval))
        self.keeper = Keeper(str(store.state_dir), host_netns, self.vm_connections,
                             interval=heal_interval, heal=heal,
                             call_on_engine=self.engine.call_soon_threadsafe)
        self.components.append(self.keeper)
        self.cluster = cluster
        self.config = config
        self._version = -1
        self._control: socket.socket | None = None
        self._lock = DaemonLock(store.state_dir)
        self.metrics: MetricsServer | None = None
        if metrics is not None:
            self.metrics = MetricsServer(metrics, self.snapshot)

    # lifecycle

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; :class:`AlreadyRunning` if another daemon serves
        the state directory."""
        self._lock.acquire()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}
        try:
            if self.host_netns:
                if threading.active_count() != 1:
                    raise RuntimeError("the daemon must enter the host namespace before "
                                       "threads")
                enter_netns(self.host_netns)
            self._open_control()
            try:
                self._open_metrics()
            except BaseException:
                self._close_control()
                raise
            self._serve()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._lock.release()
        return 0

    def _serve(self) -> None:
        try:
            if self.cluster is not None:   # its threads start here, in the host namespace
                from hns.cluster.agent import ClusterAgent
                self.components.append(ClusterAgent(str(self.store.state_dir),
                                                    self.host_netns, self.cluster))
            self.reconcile()
            self.engine.call_later(self.poll_interval, self._poll)
            sd_notify("READY=1")
            log.info("daemon ready")
            self.engine.run()
        finally:
            sd_notify("STOPPING=1")
            for component in self.components:
                component.close()
            self._close_control()
            if self.metrics is not None:
                self.metrics.close()

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:   # the loop may be mid-reconcile: reload from it
            self.engine.call_soon_threadsafe(self._reload_on_hup)
            return
        log.info("signal %d: stopping", signum)
        self.engine.stop()

    def _reload_on_hup(self) -> None:
        log.info("SIGHUP: reading the settings and the state again")
        self.keeper.reload_settings(self.config)     # the keeper's thread; it pokes us
        self.reconcile()

    # state

    def reconcile(self) -> None:
        """Make every component what the state says."""
        self._version = self.store.connection.execute("PRAGMA data_version").fetchone()[0]
        self._relay_limits()
        for component in self.components:
            component.reconcile()

    def _relay_limits(self) -> None:
        """The relay limits of the settings last applied, for the relays started next."""
        from hns.config_apply import applied
        found = applied(self.store.state_dir)
        if found is not None:
            self.engine.tcp_max_connections = found.max_connections
            self.engine.tcp_idle_timeout = float(found.relay_idle_timeout)

    def _poll(self) -> None:
        try:
            version = self.store.connection.execute("PRAGMA data_version").fetchone()[0]
            if version != self._version:
                self.reconcile()
        except Exception:  # a locked or broken database must not stop the relays
            log.exception("cannot read the state")
        self.engine.call_later(self.poll_interval, self._poll)

    # control socket

    def _open_control(self) -> None:
        path = control_path(self.store.state_dir)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()        # a killed daemon's: we hold the lock, no one serves it
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
        answer, mapped = self._engine_status()
        answer.update(portmap_rows(mapped, self._nft, self.store.instance))
        return answer

    def _engine_status(self) -> tuple[dict[str, Any], list[Any]]:
        """What only the engine thread may read: the components' status, and the port
        mappings of the store (whose counters are read from nft, anywhere)."""
        answer: dict[str, Any] = {"Running": True, "Pid": os.getpid(),
                                  "HostNetns": self.host_netns}
        for component in self.components:
            answer.update(component.status())
        return answer, self.store.port_mappings()

    def snapshot(self, timeout: float = SNAPSHOT_TIMEOUT) -> dict[str, Any]:
        """``status`` from any thread: the counters taken on the engine thread, where they
        live; nft read on the calling thread, so the engine does not wait for it.
        TimeoutError when the engine does not get to it in time."""
        done = threading.Event()
        result: list[tuple[dict[str, Any], list[Any]]] = []

        def take() -> None:
            try:
                result.append(self._engine_status())
            finally:
                done.set()

        self.engine.call_soon_threadsafe(take)
        if not done.wait(timeout):
            raise TimeoutError("the daemon's engine did not answer for a status snapshot")
        if not result:
            raise RuntimeError("the status snapshot failed on the engine thread")
        answer, mapped = result[0]
        answer.update(portmap_rows(mapped, self._nft, self.store.instance))
        return answer

    def _open_metrics(self) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.start()
        except OSError as exc:
            host, port = self.metrics.address
            raise HnsError(f"metrics: cannot listen on {host}:{port}: "
                           f"{exc.strerror or exc}") from None
        log.info("metrics on http://%s:%d/metrics", self.metrics.address[0],
                 self.metrics.port)

    def vm_connections(self) -> dict[str, int]:
        """Connections the daemon's relays hold to each VM (engine thread): localhost
        forwards and mirrored relays by VM, static proxies by the VM their connect
        address is."""
        by_ip = {str(vm.ip): vm.name for vm in self.store.vms()}
        counts: dict[str, int] = {}
        for component in self.components:
            if isinstance(component, Keeper):
                continue
            found = component.status()
            for row in [*found.get("Forwards", []), *found.get("Mirrored", [])]:
                counts[row["Vm"]] = counts.get(row["Vm"], 0) + int(row.get("Connections", 0))
            for row in found.get("Relays", []):
                vm = by_ip.get(str(row.get("Connect", "")).rsplit(":", 1)[0].strip("[]"))
                if vm is not None:
                    counts[vm] = counts.get(vm, 0) + int(row.get("Connections", 0))
        return counts
