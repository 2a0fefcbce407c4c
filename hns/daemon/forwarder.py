"""Localhost forwarding: a server that listens inside a NAT VM is reachable at host
``localhost`` on the same port, as WSL's localhost relay makes it.

Theory of operation
-------------------
:class:`Forwarder` is a component of the daemon and lives on the engine thread.
``reconcile`` (at start and whenever the state changes) makes the watched VMs what the
state says: every VM on a network with localhost forwarding on.  Each watched VM has a
:class:`~portproxy.tracker.VmTracker` (which sockets listen in its namespace) and a
:class:`~portproxy.vmdial.VmDialer` (sockets made in its namespace, for the relays to
dial with).  One timer polls every tracker, each ``poll_interval`` + ``poll_per_vm`` x
the number of VMs (20 ms + 1 ms per VM: a wake-up costs more than a VM's poll, so the
polls are batched; the interval grows with the VMs so that the cost stays below 2 % of
a core -- see :mod:`portproxy.tracker` for the figures).  When a VM's listening
sockets change,
its claims (:class:`~hns.daemon.forward_plan.Claims`) follow and the plan is made again
(:func:`~hns.daemon.forward_plan.plan`, pure): forwards whose VM changed or went are
stopped, new ones started.

A forward is a listening (TCP) or bound (UDP) socket on host ``127.0.0.1:P`` or
``[::1]:P`` -- loopback only, in the daemon's namespace, i.e. the host -- handed to the
relay engine with the VM's dialer, so every connection or flow goes to the VM's own
loopback of the same family.  TCP listeners set SO_REUSEADDR (a TIME_WAIT left by an
earlier forward must not block the port); UDP sockets do not, or they could share the
port with another socket of the host that set it.  A host port that cannot be bound
(in use: "conflict: host port in use") is logged once, shown in the status and retried
every ``retry_interval`` until it is free.  Stopping a forward closes its listener and
resets its connections.

The ephemeral cap: the host's ``ip_local_port_range`` (of the daemon's namespace, the
host) is read at each ``reconcile`` and every ``full_interval``; a change plans again.
The plan holds at most half of that range per protocol (see
:mod:`hns.daemon.forward_plan`); the other claims are conflicts in the status.

The kernel path (docs/datapath.md): a served IPv4 port whose VM socket listens on
every address is also translated by the daemon's fast table (:mod:`hns.daemon.fastpath`),
host ``127.0.0.1:P`` -> the VM's address, port P, so connections never reach the relay
listener, which stays bound: it reserves the port and serves if the translation cannot be
made.  ``kernel=False`` (``hnsctl daemon --localhost-path relay``) keeps every forward on
the relay.

A VM whose namespace cannot be opened (not made yet, gone) is retried every
``full_interval`` (2 s), when its namespace is also checked for having been replaced
under the same name (``restore`` after a reboot), by inode.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Any

from hns.daemon.binding import Bound, Retrying, strerror
from hns.daemon.config import ProxyConfig
from hns.daemon.counters import relay_counters
from hns.daemon.fastpath import FastPath
from hns.daemon.forward_plan import (
    Claims,
    ForwardKey,
    Plan,
    changes,
    kernel_keys,
    plan,
    reserved_by,
    wanted_keys,
)
from hns.daemon.vmwatch import REAL_SOCKETS, NetnsSockets, VmWatch
from hns.model import NetworkType, Vm
from hns.store import Store
from nat.fastpath import FastEntry
from portproxy.engine import Engine, Relay, RelayInfo, TimerHandle
from portproxy.tracker import read_port_range
from portproxy.vmdial import DEFAULT_POOL_SIZE

__all__ = ["FULL_INTERVAL", "POLL_INTERVAL", "POLL_PER_VM", "Forwarder"]

log = logging.getLogger("hns.daemon")

POLL_INTERVAL = 0.02      # s between two polls of every VM's sockstat gate ...
POLL_PER_VM = 0.001       # ... plus this much per watched VM
FULL_INTERVAL = 2.0       # s between two full dumps of a VM (and namespace checks)
HOST_PORT_IN_USE = "conflict: host port in use"


def _forward_error(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return HOST_PORT_IN_USE
    return f"error: {strerror(exc)}"


@dataclass
class _Forward(Bound):
    """One host port served (or waiting to be) for one VM."""

    key: ForwardKey
    vm: str
    relay: Relay | None = None
    kernel: bool = False       # translated by the fast table too

    @property
    def name(self) -> str:
        return f"localhost {self.vm} {self.key.protocol} {self.key.endpoint()}"


class Forwarder:
    """Serves on host loopback the ports the VMs listen on (a daemon component)."""

    def __init__(self, engine: Engine, store: Store, *, poll_interval: float = POLL_INTERVAL,
                 poll_per_vm: float = POLL_PER_VM, full_interval: float = FULL_INTERVAL,
                 retry_interval: float = 2.0, pool_size: int = DEFAULT_POOL_SIZE,
                 sockets: NetnsSockets = REAL_SOCKETS, fast: FastPath | None = None,
                 kernel: bool = True) -> None:
        self.engine = engine
        self.fast = fast
        self.kernel = kernel and fast is not None
        self.store = store
        self.sockets = sockets
        self.poll_interval = poll_interval
        self.poll_per_vm = poll_per_vm
        self.full_interval = full_interval
        self.retry_interval = retry_interval
        self.pool_size = pool_size
        self._watches: dict[str, VmWatch] = {}         # by VM name
        self._proxies: ProxyConfig | None = None      # made on first use: it does I/O
        self._reserved: dict[ForwardKey, str] = {}
        self._claims = Claims()
        self._kernel_keys: dict[str, frozenset[ForwardKey]] = {}   # by VM name
        self._bridges: dict[str, str] = {}                           # network ID -> bridge
        self._plan = Plan({}, {})
        self._forwards: dict[ForwardKey, _Forward] = {}
        self._timer: TimerHandle | None = None
        self._ephemeral: tuple[int, int] | None = None     # the host's, read on reconcile
        self._next_range = 0.0

    # -- the Component protocol -----------------------------------------------------------

    def reconcile(self) -> None:
        """Watch exactly the VMs on networks with localhost forwarding on."""
        networks = [n for n in self.store.networks()   # mirrored: see hns/daemon/mirror.py
                    if n.localhost_forwarding and
                    n.type in (NetworkType.NAT, NetworkType.OVERLAY)]
        on = {n.id for n in networks}
        self._bridges = {n.id: n.bridge for n in networks}
        desired = {vm.name: vm for vm in self.store.vms()
                   if vm.network_id in on and vm.running}
        if self._proxies is None:
            self._proxies = ProxyConfig(self.store)
        self._reserved = reserved_by(self._proxies.list())
        for name, watch in list(self._watches.items()):
            if desired.get(name) != watch.vm:
                self._unwatch(name)
        for name, vm in desired.items():
            if name not in self._watches:
                self._watch(vm)
        self._refresh_range(self.engine.now())
        self._replan()
        if self._watches and self._timer is None:
            self._timer = self.engine.call_later(self.interval(), self._tick)

    def interval(self) -> float:
        """Seconds between two polls: longer with more VMs, so the cost stays bounded."""
        return self.poll_interval + self.poll_per_vm * len(self._watches)

    def status(self) -> dict[str, Any]:
        infos = {info.name: info for info in self.engine.relays()}
        rows = [self._row(name, key, infos) for name in sorted(self._watches)
                for key in sorted(self._claims.of(name))]
        return {"Forwards": rows}

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for key in list(self._forwards):
            self._stop(key)
        for name in list(self._watches):
            self._unwatch(name)

    # -- VMs ------------------------------------------------------------------------------

    def _watch(self, vm: Vm) -> None:
        watch = VmWatch(vm, self.engine.call_soon_threadsafe, full_interval=self.full_interval,
                        pool_size=self.pool_size, sockets=self.sockets)
        self._watches[vm.name] = watch
        if watch.open(self.engine.now()):
            self._update(watch)

    def _unwatch(self, name: str) -> None:
        watch = self._watches.pop(name)
        self._claims.remove(name)
        self._kernel_keys.pop(name, None)
        watch.close()

    def _tick(self) -> None:
        self._timer = None
        try:
            self._poll_all(self.engine.now())
        finally:
            if self._watches and self._timer is None:
                self._timer = self.engine.call_later(self.interval(), self._tick)

    def _poll_all(self, now: float) -> None:
        changed = False
        for watch in list(self._watches.values()):
            try:
                if not watch.poll(now):
                    continue
            except Exception as exc:     # one VM must not stop the others' polling
                log.exception("vm %s: poll failed", watch.vm.name)
                watch.reset(str(exc))
            changed = True
            if watch.ready:
                self._update(watch)
            else:
                self._claims.remove(watch.vm.name)
                self._kernel_keys.pop(watch.vm.name, None)
        if now >= self._next_range:
            changed |= self._refresh_range(now)
        if changed:
            self._replan()

    def _update(self, watch: VmWatch) -> None:
        sockets = watch.tracker.sockets
        self._claims.update(watch.vm.name, wanted_keys(sockets))
        self._kernel_keys[watch.vm.name] = kernel_keys(sockets)

    def _refresh_range(self, now: float) -> bool:
        """Read the host's ephemeral port range (this thread's namespace: the daemon's);
        True when it changed."""
        self._next_range = now + self.full_interval
        ephemeral = read_port_range()
        if ephemeral == self._ephemeral:
            return False
        if self._ephemeral is not None:
            log.info("the host's ephemeral port range is now %d-%d", *ephemeral)
        self._ephemeral = ephemeral
        return True

    # -- forwards -------------------------------------------------------------------------

    def _replan(self) -> None:
        old = self._plan
        self._plan = plan(self._claims.snapshot(), self._reserved, self._ephemeral)
        for (vm, key), reason in self._plan.conflicts.items():
            if old.conflicts.get((vm, key)) != reason:
                log.warning("vm %s: %s %s is not forwarded: %s", vm, key.protocol,
                            key.endpoint(), reason)
        current = {key: f.vm for key, f in self._forwards.items()}
        stop, start = changes(current, self._plan.owners)
        for key in stop:
            self._stop(key)
        for key in start:
            forward = _Forward(key, self._plan.owners[key])
            self._forwards[key] = forward
            self._start(forward)
        for forward in self._forwards.values():
            self._sync_path(forward)

    def _sync_path(self, forward: _Forward) -> None:
        """Translate the forward in the kernel when its VM listens on every address and
        its relay listener holds the port; stop translating when either is no more."""
        watch = self._watches.get(forward.vm)
        want = (self.kernel and forward.relay is not None and watch is not None and
                forward.key in self._kernel_keys.get(forward.vm, frozenset()))
        if want == forward.kernel or self.fast is None:
            return
        if not want:
            self.fast.remove(("localhost", forward.key))
            forward.kernel = False
            return
        assert watch is not None
        key = forward.key
        entry = FastEntry(key.protocol, key.port, watch.vm.ip, key.port, localhost=True)
        bridge = self._bridges.get(watch.vm.network_id)
        if bridge is not None and self.fast.add(("localhost", key), entry, bridge):
            forward.kernel = True
            log.info("vm %s: %s %s through the kernel", forward.vm, key.protocol,
                     key.endpoint())

    def _start(self, forward: _Forward) -> None:
        what = f"vm {forward.vm}: cannot forward {forward.key.protocol} {forward.key.endpoint()}"
        forward.binding = Retrying(self.engine, what, lambda: self._serve(forward),
                                   self.retry_interval, _forward_error)
        forward.binding.start()

    def _serve(self, forward: _Forward) -> None:
        watch = self._watches.get(forward.vm)
        if self._forwards.get(forward.key) is not forward or watch is None or \
                forward.relay is not None:
            return
        key = forward.key
        sock = self.sockets.loopback(None, key)
        target = (key.loopback, key.port)
        try:
            if key.protocol == "tcp":
                forward.relay = self.engine.add_tcp(sock, target, name=forward.name,
                                                    dial=watch.dialer.tcp)
            else:
                forward.relay = self.engine.add_udp(sock, target, name=forward.name,
                                                    dial=watch.dialer.udp)
        except BaseException:
            sock.close()
            raise
        log.info("vm %s: forwarding %s %s", forward.vm, key.protocol, key.endpoint())
        self._sync_path(forward)

    def _stop(self, key: ForwardKey) -> None:
        forward = self._forwards.pop(key)
        if forward.kernel and self.fast is not None:
            self.fast.remove(("localhost", key))
        if forward.binding is not None:
            forward.binding.cancel()
        if forward.relay is not None:
            self.engine.remove(forward.relay)
            log.info("vm %s: stopped forwarding %s %s", forward.vm, key.protocol,
                     key.endpoint())

    def _row(self, vm: str, key: ForwardKey, infos: dict[str, RelayInfo]) -> dict[str, Any]:
        conflict = self._plan.conflicts.get((vm, key))
        forward = self._forwards.get(key)
        info = infos.get(forward.name) if forward is not None and forward.vm == vm else None
        if conflict is not None:
            state = f"conflict: {conflict}"
        elif forward is None or forward.vm != vm:
            state = "pending"
        elif forward.relay is not None:
            state = "forwarding"
        else:
            state = forward.error or "pending"
        path = "kernel" if forward is not None and forward.vm == vm and forward.kernel \
            else "relay"
        return {"Vm": vm, "Protocol": key.protocol, "Family": f"ipv{key.family}",
                "Port": key.port, "Listen": key.endpoint(), "Connect": key.endpoint(),
                "State": state, "Path": path, **relay_counters(info)}
