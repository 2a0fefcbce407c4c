"""The daemon's keeper: heals drift and reclaims idle VMs (docs/service.md).

Theory of operation
-------------------
:class:`Keeper` is a daemon component with a thread of its own, which holds its own
:class:`~hns.service.Service` (its own store connection: a repair or a stop takes the
same locks as the commands and may wait for one; the relays never wait for it).  The
thread wakes every second for the idle VMs; it heals what has no event (the VMs'
resolv.conf) every ``interval`` (5 s); a full round comes at once when rtnetlink reports
a link, address or route of the host namespace removed or nftables a change of the
ruleset (:class:`_Events`, coalesced for ``SETTLE``), when the state changed, and every
``full_interval`` (60 s, a safety net for a lost event); a round that also looks inside
every VM (eth0's address and route: its events are in its own namespace) every
``inside_interval`` (60 s).  A round:

- **heals**: :meth:`Service.heal <hns.service.Service.heal>` compares the kernel with
  the state and repairs what differs; each repair is logged (what, why) and counted;
- **reclaims**: a running VM with an idle timeout is busy while a process runs inside
  its namespace (a thread group leader whose ``/proc/PID/ns/net`` is the VM's) or a relay
  of the daemon holds a connection to it (``connections``: asked of the engine thread);
  one idle for its whole timeout is stopped, as ``hnsctl vm stop`` does, and logged.

``status`` (engine thread) reads counters the thread keeps under a lock.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from hns.errors import HnsError
from hns.heal import Repair
from hns.netns import netns_pids

__all__ = ["HEAL_INTERVAL", "Keeper", "processes_in"]

log = logging.getLogger("hns.daemon")

HEAL_INTERVAL = 5.0        # s between two looks at what has no event (resolv.conf)
FULL_INTERVAL = 60.0       # s between two full rounds without an event (a safety net)
RECLAIM_INTERVAL = 1.0     # s between two looks at the VMs that have an idle timeout
INSIDE_INTERVAL = 60.0     # s between two looks inside every VM (eth0: no event here)
SETTLE = 0.05              # s: netlink events are coalesced this long
RECENT = 10                # repairs and reclaims kept for the status

# rtnetlink multicast groups: RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE
_GROUPS = 0x1 | 0x10 | 0x40
_REMOVALS = frozenset({17, 21, 25})    # RTM_DELLINK, RTM_DELADDR, RTM_DELROUTE
NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7       # every change of the ruleset (ours too: a round finds no drift)


def processes_in(namespaces: Iterable[str]) -> dict[str, int]:
    """How many processes (thread group leaders) run inside each named namespace."""
    return {name: len(pids) for name, pids in netns_pids(namespaces).items()}


def _subscribe(protocol: int, groups: int) -> socket.socket | None:
    """A non-blocking netlink socket on ``groups`` of ``protocol``; None where it cannot
    be had (healing then falls back to the interval)."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             protocol)
    except OSError as exc:
        log.warning("no netlink events of protocol %d: %s", protocol, exc)
        return None
    try:
        sock.bind((0, groups))
        sock.setblocking(False)
    except OSError as exc:
        log.warning("no netlink events of protocol %d: %s", protocol, exc)
        sock.close()
        return None
    return sock


def message_types(data: bytes) -> list[int]:
    """The ``nlmsg_type`` of every netlink message in ``data`` (pure)."""
    types, offset = [], 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=LH", data, offset)
        if length < 16:
            break
        types.append(kind)
        offset += (length + 3) & ~3
    return types


class _Events:
    """rtnetlink removals and nftables changes in this namespace (the daemon's: the
    host's) wake ``wake``."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hns-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        route = _subscribe(NETLINK_ROUTE, _GROUPS)
        nft = _subscribe(NETLINK_NETFILTER, 1 << (NFNLGRP_NFTABLES - 1))
        watched = [s for s in (route, nft) if s is not None]
        try:
            while watched and not self._stop.is_set():
                ready, _, _ = select.select(watched, [], [], 0.5)
                woken = False
                for sock in ready:
                    while (data := _drain(sock)) is not None:
                        woken |= sock is nft or bool(_REMOVALS & set(message_types(data)))
                if woken:
                    self._wake()
        finally:
            for sock in watched:
                sock.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)


def _drain(sock: socket.socket) -> bytes | None:
    """One pending datagram; None when there is none (ENOBUFS, an overflow, counts as
    one: the wake-up is what matters, not the message)."""
    try:
        return sock.recv(65536) or None
    except BlockingIOError:
        return None
    except OSError:
        return b""


class Keeper:
    """Heals drift and reclaims idle VMs (a daemon component; see the module)."""

    def __init__(self, state_dir: str, host_netns: str | None,
                 connections: Callable[[], dict[str, int]], *,
                 interval: float = HEAL_INTERVAL, full_interval: float = FULL_INTERVAL,
                 inside_interval: float = INSIDE_INTERVAL, heal: bool = True,
                 call_on_engine: Callable[[Callable[[], object]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state_dir = state_dir
        self._clock = clock
        self.host_netns = host_netns
        self.interval = interval
        self.full_interval = full_interval
        self.inside_interval = inside_interval
        self._next_full = self._next_inside = self._next_quick = 0.0
        self.heal_enabled = heal
        self._connections = connections
        self._on_engine = call_on_engine
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._settings: list[str | None] = []      # SIGHUP: settings files to apply
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT)
        self._reclaimed: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT)
        self._last_busy: dict[str, float] = {}
        self._rounds = 0                  # healing rounds done (quick or full)
        self._error: str | None = None
        self._thread: threading.Thread | None = None
        self._events: _Events | None = None

    # -- the Component protocol (engine thread) -------------------------------------------

    def reconcile(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hns-keeper", daemon=True)
            self._thread.start()
            if self.heal_enabled:
                self._events = _Events(self._wake.set)
                self._events.start()
        self._wake.set()           # the state changed: look now

    def reload_settings(self, config: str | None) -> None:
        """Apply the live keys of the settings file (``hnsctl reload``'s work) on the
        keeper's thread."""
        with self._lock:
            self._settings.append(config)
        self._wake.set()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"Healing": {"Enabled": self.heal_enabled,
                                "Rounds": self._rounds,
                                "Repairs": sum(self._counts.values()),
                                "ByKind": dict(self._counts),
                                "Recent": list(self._recent),
                                "Error": self._error},
                    "Reclaimed": list(self._reclaimed)}

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._events is not None:
            self._events.close()
        if self._thread is not None:
            self._thread.join(10)

    # -- the keeper's thread --------------------------------------------------------------

    def _run(self) -> None:
        from hns.service import Service
        try:
            svc = Service(self.state_dir, self.host_netns)
        except HnsError as exc:
            log.error("keeper: cannot open the state: %s", exc)
            return
        try:
            while not self._stop.is_set():
                woken = self._wake.wait(min(self.interval, RECLAIM_INTERVAL))
                if woken:
                    time.sleep(SETTLE)     # a burst of events is one round
                self._wake.clear()
                if self._stop.is_set():
                    break
                self._round(svc, woken)
        finally:
            svc.close()

    def _apply_settings(self, svc: Any) -> None:
        with self._lock:
            pending, self._settings = self._settings, []
        for config in pending[-1:]:
            from hns.config_apply import read, reload
            live, restart = reload(svc, read(config))
            log.info("settings applied live: %s", ", ".join(live) or "none changed")
            if restart:
                log.warning("settings that need 'hnsctl down' and 'up': %s",
                            ", ".join(restart))

    def _round(self, svc: Any, woken: bool) -> None:
        """A round: the idle VMs every time (each second); healing full when something
        was removed (an event, a state change) or ``full_interval`` passed, inside the
        VMs every ``inside_interval``, else what has no event every ``interval``."""
        now = time.monotonic()
        inside = now >= self._next_inside
        full = woken or inside or now >= self._next_full
        quick = full or now >= self._next_quick
        if quick:
            self._next_quick = now + self.interval
        if full:
            self._next_full = now + self.full_interval
        if inside:
            self._next_inside = now + self.inside_interval
        try:
            self._apply_settings(svc)
            if self.heal_enabled and quick:
                self._record(svc.heal(full=full, inside=inside))
                with self._lock:
                    self._rounds += 1
            self._reclaim(svc)
            self._set_error(None)
        except (HnsError, OSError) as exc:
            self._set_error(str(exc))
        except Exception as exc:      # a bug must not end healing for good
            log.exception("keeper: round failed")
            self._set_error(f"{type(exc).__name__}: {exc}")

    def _set_error(self, error: str | None) -> None:
        if error is not None and error != self._error:
            log.warning("keeper: %s (trying again)", error)
        with self._lock:
            self._error = error

    def _record(self, repairs: list[Repair]) -> None:
        for repair in repairs:
            log.warning("healed %s", repair.describe())
        with self._lock:
            for repair in repairs:
                self._counts[repair.kind] += 1
                self._recent.append({"Time": time.time(), "Kind": repair.kind,
                                     "Object": repair.what, "Why": repair.why})

    # -- idle reclaim ---------------------------------------------------------------------

    def _busy_connections(self) -> dict[str, int]:
        if self._on_engine is None:
            return self._connections()
        future: concurrent.futures.Future[dict[str, int]] = concurrent.futures.Future()

        def ask() -> None:
            try:
                future.set_result(self._connections())
            except BaseException as exc:
                future.set_exception(exc)
        self._on_engine(ask)
        return future.result(timeout=5)

    def _reclaim(self, svc: Any) -> None:
        now = self._clock()
        timed = [vm for vm in svc.store.vms() if vm.running and vm.idle_timeout_ms is not None]
        for name in set(self._last_busy) - {vm.name for vm in timed}:
            del self._last_busy[name]
        if not timed:
            return
        processes = processes_in(vm.netns for vm in timed)
        connections = self._busy_connections()
        for vm in timed:
            if processes.get(vm.netns, 0) or connections.get(vm.name, 0) or \
                    vm.name not in self._last_busy:
                self._last_busy[vm.name] = now
                continue
            idle = now - self._last_busy[vm.name]
            if idle * 1000 >= vm.idle_timeout_ms:
                self._stop_idle(svc, vm.name, idle)

    def _stop_idle(self, svc: Any, name: str, idle: float) -> None:
        self._last_busy.pop(name, None)
        if svc.stop_vm(name):
            log.warning("vm %s: stopped after %.1f s idle (no process, no relayed "
                        "connection)", name, idle)
            with self._lock:
                self._reclaimed.append({"Time": time.time(), "Vm": name,
                                        "IdleSeconds": round(idle, 3)})
