"""Mirrored networks in the daemon: port coordination, inbound DNAT, loopback sharing,
and keeping the VMs' addresses in step with the host's (see docs/mirrored.md).

Theory of operation
-------------------
:class:`Mirror` is a daemon component on the engine thread.  ``reconcile`` watches
every VM of a mirrored network (a :class:`~portproxy.tracker.VmTracker` and a
:class:`~portproxy.vmdial.VmDialer` each) and, while there is one, the host namespace
too (another tracker).  A timer polls the trackers (the cost model of localhost
forwarding: 20 ms + 1 ms per VM) and, every ``view_interval``, reads the host's
addresses and routes.

When the sockets change, the VMs' claims and the host's keys are planned again
(:func:`hns.daemon.mirror_plan.plan`, pure) and the differences applied:

- *inbound*: elements of the maps of the host table ``inet hns-<inst>-mirror``
  (``nat.mirror``), one nft transaction per change;
- *to VM*: a host loopback listener relayed into the VM (dialing inside its namespace);
- *to host*: a listener on the VM's loopback (made by a thread inside the VM's
  namespace) relayed to the host's loopback.

A key a VM owned stays its own while the VM has a connection it accepted on the port
(``MirrorPlan.draining``): the VM trackers keep ``connected_ports`` (``track_connected``,
set before every poll since :class:`~hns.daemon.vmwatch.VmWatch` makes a new tracker on
a reset), and each update of a VM's claims keeps its owned keys on those ports
(:func:`hns.daemon.mirror_plan.draining`), their sequence numbers too.  Its listener,
inbound element and relayed connections stay; the status shows "forwarding (draining: N
connections)" for it.  The ephemeral cap: the host's ``ip_local_port_range`` (read by the
engine thread: the daemon runs inside the host namespace) is read with the host's view.

Every socket the component listens on is remembered by inode and left out of what the
trackers report, so its own listeners never count as the host's or a VM's.  A listener
that cannot be bound is retried every ``retry_interval``.

When the host's view changes, every mirrored VM is configured again
(``Kernel.configure_mirrored_vm``: its addresses, routes and ``hns-mirror`` table) and the
host table is rendered again with the new addresses.  The table exists while the daemon
runs and a mirrored VM exists.

Seams: the component reads and configures the kernel through a
:class:`~hns.kernel_api.Kernel` (``kernel=``), runs nft through ``nft=`` (a runner per
namespace) and reaches sockets inside namespaces through a
:class:`~hns.daemon.vmwatch.NetnsSockets` (``sockets=``); the real ones by default, fakes
in the unit tests.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

from hns.daemon.binding import Retrying
from hns.daemon.counters import relay_counters
from hns.daemon.forward_plan import Claims, ForwardKey
from hns.daemon.forwarder import FULL_INTERVAL, POLL_INTERVAL, POLL_PER_VM
from hns.daemon.mirror_parts import Listener, Watch, listen_error
from hns.daemon.mirror_plan import MirrorPlan, draining, host_keys, plan, vm_claims
from hns.daemon.vmwatch import REAL_SOCKETS, NetnsSockets, Tracker, VmWatch
from hns.errors import HnsError
from hns.kernel_api import Kernel
from hns.mirrored import HostView, mirror_spec, transit_addresses
from hns.model import Network, Vm
from hns.naming import instance_alias_prefix, nft_table_name
from hns.nft import nft as hns_nft
from hns.store import Store
from nat.mirror import (
    VM_TABLE,
    InboundPort,
    host_port_elements,
    inbound_elements,
    inbound_table,
)
from nat.nft import NftRunner
from nat.transaction import Transaction
from portproxy.engine import Engine, TimerHandle
from portproxy.tracker import DiagSocket, read_port_range

__all__ = ["VIEW_INTERVAL", "Mirror"]

log = logging.getLogger("hns.daemon")

VIEW_INTERVAL = 1.0       # s between two reads of the host's addresses and routes


class Mirror:
    """The daemon's part of mirrored networks (a daemon component)."""

    def __init__(self, engine: Engine, store: Store, host_netns: str | None, *,
                 poll_interval: float = POLL_INTERVAL, poll_per_vm: float = POLL_PER_VM,
                 full_interval: float = FULL_INTERVAL, view_interval: float = VIEW_INTERVAL,
                 retry_interval: float = 2.0, kernel: Kernel | None = None,
                 nft: Callable[[str | None], NftRunner] = hns_nft,
                 sockets: NetnsSockets = REAL_SOCKETS) -> None:
        self.engine = engine
        self.store = store
        self.sockets = sockets
        self.host_netns = host_netns
        self.poll_interval = poll_interval
        self.poll_per_vm = poll_per_vm
        self.full_interval = full_interval
        self.view_interval = view_interval
        self.retry_interval = retry_interval
        self.table = f"{nft_table_name(store.instance)}-mirror"
        self._nft_in = nft
        self._nft = nft(None)             # the daemon runs inside the host namespace
        self._kernel = kernel             # made on first use when not given
        self._own_kernel = kernel is None
        self._view: HostView | None = None
        self._next_view = 0.0
        self._host: Tracker | None = None
        self._watches: dict[str, Watch] = {}
        self._order = Claims()
        self._reserved: dict[tuple[str, int], str] = {}
        self._plan = MirrorPlan()
        self._inbound: dict[ForwardKey, InboundPort] = {}
        self._table_made = False
        self._listeners: dict[tuple[str, ForwardKey, bool], Listener] = {}
        self._own: set[int] = set()
        self._host_ports: dict[str, frozenset[tuple[int, str, int]]] = {}
        self._timer: TimerHandle | None = None
        self._ephemeral: tuple[int, int] | None = None

    # -- the Component protocol -----------------------------------------------------------

    def reconcile(self) -> None:
        nets = {n.id: n for n in self.store.networks() if n.mirrored}
        desired = {vm.name: vm for vm in self.store.vms()
                   if vm.network_id in nets and vm.running}
        for name, watch in list(self._watches.items()):
            if desired.get(name) != watch.vm or nets.get(watch.net.id) != watch.net:
                self._unwatch(name)
        self._reserved = {(m.mapping.protocol.keyword, m.mapping.external_port):
                          f"the port mapping of vm {m.mapping.vm}"
                          for m in self.store.port_mappings()}
        if not desired:
            self._stop_all()
            return
        self._host_ports = {}     # the VM tables may have been rendered again: add anew
        self._open_host()
        for name, vm in desired.items():
            if name not in self._watches:
                self._watch(vm, nets[vm.network_id])
        self._refresh_view(force=self._view is None)
        self._replan()
        if self._timer is None:
            self._timer = self.engine.call_later(self.interval(), self._tick)

    def interval(self) -> float:
        return self.poll_interval + self.poll_per_vm * (len(self._watches) + 1)

    def status(self) -> dict[str, Any]:
        rows = []
        for name in sorted(self._watches):
            kept = {key for vm, key in self._plan.draining if vm == name}
            for key in sorted(self._watches[name].claims.keys() | kept):
                rows.append(self._row(name, key, to_host=False))
        for (name, key) in sorted(self._plan.reverse):
            rows.append(self._row(name, key, to_host=True))
        return {"Mirrored": rows}

    def close(self) -> None:
        self._stop_all()
        if self._kernel is not None and self._own_kernel:
            self._kernel.close()
            self._kernel = None

    # -- watching -------------------------------------------------------------------------

    def _stop_all(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for name in list(self._watches):
            self._unwatch(name)
        self._host_ports = {}
        for ident in list(self._listeners):
            self._stop(ident)
        self._plan = MirrorPlan()
        self._inbound = {}
        if self._host is not None:
            self._host.close()
            self._host = None
        if self._table_made:
            try:
                self._nft.run(Transaction().destroy_table("inet", self.table))
            except HnsError as exc:
                log.warning("cannot delete nft table %s: %s", self.table, exc)
            self._table_made = False
        self._view = None

    def _open_host(self) -> None:
        if self._host is None:
            host = self.sockets.tracker(self.host_netns, self.full_interval)
            host.open()
            host.poll(self.engine.now())
            self._host = host

    def _watch(self, vm: Vm, net: Network) -> None:
        watch = Watch(VmWatch(vm, self.engine.call_soon_threadsafe,
                               full_interval=self.full_interval, sockets=self.sockets), net)
        self._watches[vm.name] = watch
        watch.w.tracker.track_connected = True
        if watch.w.open(self.engine.now()):
            self._update_claims(watch)

    def _unwatch(self, name: str) -> None:
        watch = self._watches.pop(name)
        self._order.remove(name)
        self._host_ports.pop(name, None)
        self._stop_listeners(name)
        watch.w.close()

    def _stop_listeners(self, name: str) -> None:
        for ident in [i for i in self._listeners if i[0] == name]:
            self._stop(ident)

    def _sockets(self, tracker: Tracker) -> list[DiagSocket]:
        return [s for s in tracker.sockets if s.inode not in self._own]

    def _update_claims(self, watch: Watch) -> None:
        primary = [a for a in (self._view.primary4, self._view.primary6) if a is not None] \
            if self._view is not None else []
        name = watch.vm.name
        watch.claims = vm_claims(self._sockets(watch.w.tracker), primary,
                                 watch.net.ignored_ports)
        watch.draining = draining(self._plan.owners, {name: watch.claims},
                                  {name: watch.w.tracker.connected_ports}).get(name, {})
        self._order.update(name, watch.claims.keys() | watch.draining.keys())

    def _tick(self) -> None:
        self._timer = None
        try:
            self._poll_all(self.engine.now())
        except Exception:
            log.exception("mirrored networks: poll failed")
        finally:
            if self._watches and self._timer is None:
                self._timer = self.engine.call_later(self.interval(), self._tick)

    def _poll_all(self, now: float) -> None:
        changed = False
        if self._host is not None:
            changed |= self._host.poll(now)
        for watch in list(self._watches.values()):
            watch.w.tracker.track_connected = True     # a reset made a new tracker
            if not watch.w.poll(now):
                continue
            changed = True
            if watch.w.ready:
                self._update_claims(watch)
            else:                       # reset: its listeners go, it is opened again
                self._stop_listeners(watch.vm.name)
                watch.claims, watch.draining = {}, {}
                self._order.remove(watch.vm.name)
        if now >= self._next_view:
            changed |= self._refresh_view()
        if changed:
            self._replan()

    # -- the host's view ------------------------------------------------------------------

    def _refresh_view(self, force: bool = False) -> bool:
        """Read the host's addresses and routes; on a change configure every VM again and
        render the host table.  Read the host's ephemeral port range too.  True when the
        view or the range changed."""
        self._next_view = self.engine.now() + self.view_interval
        self._heal_table()
        ephemeral, self._ephemeral = self._ephemeral, read_port_range()
        if self._kernel is None:
            from hns.kernel import LinuxKernel
            self._kernel = LinuxKernel(None)
        bridges = frozenset(n.bridge for n in self.store.networks())
        try:
            view = self._kernel.host_view(skip_links=bridges)
        except HnsError as exc:
            log.warning("cannot read the host's addresses: %s", exc)
            return ephemeral != self._ephemeral
        if view == self._view and not force:
            return ephemeral != self._ephemeral
        if self._view is not None:
            log.info("the host's addresses or routes changed: mirroring them again")
        self._view = view
        for watch in self._watches.values():
            self._configure(watch, view)
            self._update_claims(watch)
        self._render_table()
        return True

    def _heal_table(self) -> None:
        """The host table back if something removed it (``nft flush ruleset``)."""
        if not self._table_made:
            return
        try:
            gone = self._nft.list_table("inet", self.table) is None
        except HnsError as exc:
            log.debug("cannot list nft table %s: %s", self.table, exc)
            return
        if gone:
            log.warning("healed nft table inet %s: it was gone", self.table)
            self._render_table()

    def _configure(self, watch: Watch, view: HostView) -> None:
        assert self._kernel is not None
        spec = mirror_spec(watch.vm, self.store.instance, view)
        try:
            self._kernel.configure_mirrored_vm(spec, watch.vm.interface)
        except (HnsError, OSError) as exc:
            log.warning("vm %s: cannot mirror the host's addresses: %s", watch.vm.name, exc)
        self._host_ports.pop(watch.vm.name, None)   # a new table: its sets are empty

    def _render_table(self) -> None:
        addresses = [a.ip for a in self._view.addresses] if self._view is not None else []
        try:
            owner = instance_alias_prefix(self.store.instance_id).rstrip(":")
            self._nft.run(Transaction().replace_table(inbound_table(
                self.table, addresses, self._inbound.values(), owner=owner)))
            self._table_made = True
        except HnsError as exc:
            log.error("cannot make nft table %s: %s", self.table, exc)

    # -- applying the plan ----------------------------------------------------------------

    def _replan(self) -> None:
        if self._host is None:
            return
        addresses = [a.ip for a in self._view.addresses] if self._view is not None else []
        held, local = host_keys(self._sockets(self._host), addresses)
        claims = {name: w.claims for name, w in self._watches.items()}
        drain = {name: w.draining for name, w in self._watches.items() if w.draining}
        ignored = {name: w.net.ignored_ports for name, w in self._watches.items()}
        old, self._plan = self._plan, plan(claims, self._order.snapshot(), held, local,
                                           self._reserved, ignored, drain=drain,
                                           ephemeral=self._ephemeral)
        for (vm, key), reason in self._plan.conflicts.items():
            if old.conflicts.get((vm, key)) != reason:
                log.warning("vm %s: %s port %d (IPv%d) is not forwarded: %s", vm,
                            key.protocol, key.port, key.family, reason)
        self._apply_inbound()
        self._apply_listeners()
        self._apply_host_ports()

    def _inbound_port(self, vm: str, key: ForwardKey) -> InboundPort:
        watch = self._watches[vm]
        transit4, transit6 = transit_addresses(watch.vm, self.store.instance)
        target = transit4 if key.family == 4 else transit6
        return InboundPort(key.protocol, key.port, target, watch.net.host_address_loopback)

    def _apply_inbound(self) -> None:
        desired = {key: self._inbound_port(vm, key)
                   for key, (vm, claim) in self._plan.owners.items() if claim.inbound}
        gone = [p for k, p in self._inbound.items() if desired.get(k) != p]
        new = [p for k, p in desired.items() if self._inbound.get(k) != p]
        if not gone and not new:
            return
        self._inbound = desired
        change = Transaction()
        for name, elements in inbound_elements(gone).items():
            change.delete_elements("inet", self.table, name, elements)
        for name, elements in inbound_elements(new).items():
            change.add_elements("inet", self.table, name, elements)
        try:
            self._nft.run(change)
        except HnsError as exc:
            log.debug("incremental change of %s refused (%s): rendering it whole", self.table,
                      exc)
            self._render_table()

    def _apply_listeners(self) -> None:
        desired: dict[tuple[str, ForwardKey, bool], str] = {
            (vm, key, False): claim.target for key, (vm, claim) in self._plan.owners.items()}
        desired.update({(vm, key, True): key.loopback for vm, key in self._plan.reverse})
        for ident, listener in list(self._listeners.items()):
            if desired.get(ident) != listener.target:
                self._stop(ident)
        for ident, target in desired.items():
            if ident not in self._listeners:
                listener = Listener(ident[0], ident[1], ident[2], target)
                self._listeners[ident] = listener
                self._start(listener)

    def _apply_host_ports(self) -> None:
        """Host-address loopback, the VM's way: the host's loopback services that a VM
        reaches through its relay at 127.0.0.1 it reaches at the host's address too."""
        for name, watch in self._watches.items():
            if not watch.net.host_address_loopback or not watch.w.ready:
                continue
            desired = frozenset((key.family, key.protocol, key.port)
                                for vm, key in self._plan.reverse if vm == name)
            current = self._host_ports.get(name)
            if current == desired:
                continue
            change = Transaction()
            for set_name, elements in host_port_elements((current or frozenset())
                                                         - desired).items():
                change.delete_elements("inet", VM_TABLE, set_name, elements)
            for set_name, elements in host_port_elements(
                    desired - (current or frozenset())).items():
                change.add_elements("inet", VM_TABLE, set_name, elements)
            try:
                if change:
                    self._nft_in(watch.vm.netns).run(change)
                self._host_ports[name] = desired
            except HnsError as exc:
                log.warning("vm %s: cannot update its host ports: %s", name, exc)
                self._host_ports.pop(name, None)

    def _start(self, listener: Listener) -> None:
        listener.binding = Retrying(self.engine, f"{listener.name}: cannot listen",
                                    lambda: self._serve(listener), self.retry_interval,
                                    listen_error)
        listener.binding.start()

    def _serve(self, listener: Listener) -> None:
        ident = (listener.vm, listener.key, listener.to_host)
        watch = self._watches.get(listener.vm)
        if self._listeners.get(ident) is not listener or watch is None or \
                listener.relay is not None:
            return
        key = listener.key
        sock = self.sockets.loopback(watch.vm.netns if listener.to_host else None, key)
        target = (listener.target, key.port)
        if listener.to_host:
            dial_tcp, dial_udp = None, None       # the engine's namespace: the host
        else:
            dial_tcp, dial_udp = watch.w.dialer.tcp, watch.w.dialer.udp
        try:
            if key.protocol == "tcp":
                listener.relay = self.engine.add_tcp(sock, target, name=listener.name,
                                                     dial=dial_tcp)
            else:
                listener.relay = self.engine.add_udp(sock, target, name=listener.name,
                                                     dial=dial_udp)
        except BaseException:
            sock.close()
            raise
        listener.inode = os.fstat(sock.fileno()).st_ino
        self._own.add(listener.inode)
        log.info("vm %s: %s", listener.vm, listener.name)

    def _stop(self, ident: tuple[str, ForwardKey, bool]) -> None:
        listener = self._listeners.pop(ident)
        if listener.binding is not None:
            listener.binding.cancel()
        if listener.relay is not None:
            self.engine.remove(listener.relay)
            log.info("vm %s: stopped %s", listener.vm, listener.name)
        self._own.discard(listener.inode)

    def _row(self, vm: str, key: ForwardKey, to_host: bool) -> dict[str, Any]:
        listener = self._listeners.get((vm, key, to_host))
        conflict = None if to_host else self._plan.conflicts.get((vm, key))
        if conflict is not None:
            state = f"conflict: {conflict}"
        elif listener is None:
            state = "pending"
        elif listener.relay is not None and (vm, key) in self._plan.draining:
            count = self._watches[vm].w.tracker.connected_ports.get(key.port, 0)
            state = f"forwarding (draining: {count} connection{'' if count == 1 else 's'})"
        elif listener.relay is not None:
            state = "forwarding"
        else:
            state = listener.error or "pending"
        owner = self._plan.owners.get(key)
        inbound = not to_host and owner is not None and owner[0] == vm and owner[1].inbound
        info = None
        if listener is not None and listener.relay is not None:
            with contextlib.suppress(Exception):
                info = listener.relay.info()
        return {"Vm": vm, "Protocol": key.protocol, "Family": f"ipv{key.family}",
                "Port": key.port, "Direction": "to host" if to_host else "to vm",
                "Inbound": inbound, "State": state, **relay_counters(info)}
