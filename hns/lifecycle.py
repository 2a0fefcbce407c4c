"""A VM's power: ``vm stop`` and ``vm start``, and the state ``vm list`` shows.

A stopped VM keeps its row (address, MAC, port mappings, proxies that name its address)
and loses its kernel objects: its processes are killed, its namespace, veth and
resolv.conf removed.  Its port mappings leave the NAT table (:class:`~hns.nat_table.
NatTable` renders running VMs' only), so a connection to a mapped port reaches the host
itself, where nothing listens: refused, not black-holed.  ``start`` makes the namespace
and veth again with the same address and MAC and puts the mappings back.

Order (crash safety): ``stop`` marks the row stopped and renders the table before it
tears the kernel objects down, ``start`` tears down whatever a killed stop left, makes
the objects, then marks the row running.  A ``stop`` of a stopped VM removes what a
killed stop left behind; a ``start`` that fails leaves the VM stopped and nothing made.
Each holds the VM's lock (and the network's, shared), in the order every command takes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from hns.errors import HnsError
from hns.kernel_api import Kernel
from hns.model import Network, Power, Vm, parse_name
from hns.nat_table import NatTable
from hns.store import Store

__all__ = ["MISSING", "VmLifecycle"]

log = logging.getLogger("hns")

MISSING = "Missing"      # running in the state, its namespace gone behind hns's back


class VmLifecycle:
    """Stops and starts VMs (a part of :class:`hns.service.Service`)."""

    def __init__(self, store: Store, kernel: Callable[[], Kernel], nat: NatTable,
                 apply_vm: Callable[[Vm, Network], None], teardown_vm: Callable[[Vm], None],
                 poke: Callable[[], None]) -> None:
        self.store = store
        self._kernel = kernel
        self.nat = nat
        self._apply = apply_vm
        self._teardown = teardown_vm
        self._poke = poke

    def state(self, vm: Vm) -> str:
        """``Running``, ``Stopped`` or ``Missing``."""
        if vm.running and not self._kernel().netns_exists(vm.netns):
            return MISSING
        return vm.power.value.capitalize()

    def stop(self, name: str) -> bool:
        """Power VM ``name`` off; False if it was stopped already."""
        name = parse_name(name, "vm name")
        with self.store.lock(f"vm-{name}"):
            vm = self.store.vm(name)
            if vm.running:
                with self.nat.lock():
                    with self.store.write() as tx:
                        tx.set_power(vm.id, Power.STOPPED)
                    self.nat.sync_locked()
            self._teardown(vm)
        self._poke()
        if vm.running:
            log.info("vm %s: stopped", name)
        return vm.running

    def start(self, name: str) -> bool:
        """Power VM ``name`` on; False if it was running already."""
        name = parse_name(name, "vm name")
        vm = self.store.vm(name)
        with self.store.lock(f"network-{vm.network}", shared=True), \
                self.store.lock(f"vm-{name}"):
            vm = self.store.vm(name)
            if vm.running:
                return False
            net = self.store.network(vm.network)
            self._teardown(vm)              # what a killed stop may have left
            try:
                self._apply(vm, net)
                with self.nat.lock():
                    with self.store.write() as tx:
                        tx.set_power(vm.id, Power.RUNNING)
                    self.nat.sync_locked()
            except BaseException:
                with contextlib.suppress(HnsError, OSError):
                    self._teardown(vm)
                with self.store.write() as tx:
                    tx.set_power(vm.id, Power.STOPPED)
                raise
        self._poke()
        log.info("vm %s: started (%s, %s)", name, vm.ip, vm.mac)
        return True
