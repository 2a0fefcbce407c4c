"""Port mappings (HNS's PortMapping policy; the pure half is :mod:`hns.portmap`): a part
of :class:`hns.service.Service`, which delegates its port-mapping methods here.

Adds go store first, then one nft transaction of map elements, undone together on
failure; deletes go nft first.  Where nft refuses an incremental change, the whole table
is rendered from the state.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

from hns import portmap
from hns.errors import Conflict, HnsError
from hns.failpoint import failpoint
from hns.model import HostPort, PortMapping, Protocol, parse_name
from hns.store import MappedPort, Store
from nat.errors import NatError
from nat.ruleset import PM_COUNT, count_set, port_map_elements
from nat.transaction import Transaction

if TYPE_CHECKING:
    from hns.nat_table import NatTable

__all__ = ["PortMappings", "UdpFlush"]

log = logging.getLogger("hns")


# deletes the host's UDP conntrack entries to (port, address or None: any) pairs; how many
UdpFlush = Callable[[list[tuple[int, IPv4Address | None]]], int]


class PortMappings:
    """The port mappings of one instance: ``store`` holds them, ``nat`` renders them,
    ``flush_udp`` removes the stale UDP flows to a newly mapped port."""

    def __init__(self, store: Store, nat: NatTable, flush_udp: UdpFlush) -> None:
        self.store = store
        self.nat = nat
        self.flush_udp = flush_udp

    def listed(self, vm: str | None = None) -> list[PortMapping]:
        vm_id = self.store.vm(vm).id if vm is not None else None
        return [m.mapping for m in self.store.port_mappings(vm_id)]

    def add(self, vm: str, protocol: Protocol | str, external_port: int | str,
                         internal_port: int | str,
                         host_address: IPv4Address | str | None = None) -> PortMapping:
        """Forward host ``protocol``/``external_port`` (on ``host_address``, or every host
        address) to ``internal_port`` of the VM."""
        mapping = PortMapping.parse(vm, protocol, external_port, internal_port, host_address)
        return self.add_many([mapping])[0]

    def add_many(self, mappings: Iterable[PortMapping]) -> list[PortMapping]:
        """Add mappings, all or none: one store and one nft transaction."""
        batch = [PortMapping.parse(m.vm, m.protocol, m.external_port, m.internal_port,
                                   m.host_address) for m in mappings]  # built by hand?
        portmap.check_batch(batch)
        if not batch:
            return []
        ports = [m.host_port for m in batch]
        with self.nat.lock():
            self.finish_incomplete()
            with self.store.write() as tx:
                vms = portmap.check_free(self.store, batch)
                tx.insert_port_mappings({n: v.id for n, v in vms.items()}, batch, "adding")
            failpoint("portmap-add:after-store")
            try:
                specs = [portmap.spec(m, vms[m.vm].ip) for m in batch
                         if vms[m.vm].running]      # a stopped VM's wait for its start
                change = Transaction()
                for name, elements in port_map_elements(specs).items():
                    change.add_elements("inet", self.nat.name, name, elements)
                if specs:      # kept after a delete: another mapping may count there
                    change.add_elements("inet", self.nat.name, PM_COUNT,
                                        count_set(specs).elements)
                self.nat.apply_or_render(change)
                failpoint("portmap-add:after-nft")
                with self.store.write() as tx:
                    tx.set_port_mappings_state(ports, "ready")
            except BaseException:
                with self.store.write() as tx:
                    tx.delete_port_mappings(ports)
                with contextlib.suppress(HnsError):
                    self.nat.sync_locked()  # in case nft was interrupted half way
                raise
        self._flush_udp_conntrack(batch)
        return batch

    def delete(self, vm: str, protocol: Protocol | str, external_port: int | str,
                            host_address: IPv4Address | str | None = None) -> bool:
        """Delete the VM's mapping of that host port; False if there is none."""
        name = parse_name(vm, "vm name")
        port = HostPort.parse(protocol, external_port, host_address)
        with self.nat.lock():
            self.finish_incomplete()
            found = self.store.find_port_mapping(port)
            if found is None:
                return False
            if found.mapping.vm != name:
                raise Conflict(f"host port {port.describe()} is mapped to vm "
                               f"{found.mapping.vm!r}, not {name!r}")
            with self.store.write() as tx:
                tx.set_port_mappings_state([port], "deleting")
            failpoint("portmap-delete:after-mark")
            self.remove([found])
            failpoint("portmap-delete:after-nft")
            with self.store.write() as tx:
                tx.delete_port_mappings([port])
        return True

    def finish_incomplete(self) -> None:
        """Roll back mappings whose add or delete was killed (the caller holds the nft
        lock, which every mapping command holds throughout: nobody works on them)."""
        leftovers = self.store.incomplete_port_mappings()
        if not leftovers:
            return
        log.info("removing %d port mapping(s) an interrupted command left: %s",
                 len(leftovers), ", ".join(m.mapping.describe() for m in leftovers))
        self.remove(leftovers)
        with self.store.write() as tx:
            tx.delete_port_mappings([m.mapping.host_port for m in leftovers])

    def remove(self, mapped: list[MappedPort]) -> None:
        """The nft side of deleting mappings (the caller holds the nft lock)."""
        change = Transaction()
        in_nft = [m for m in mapped if m.running]
        for name, elements in port_map_elements(portmap.specs(in_nft)).items():
            change.delete_elements("inet", self.nat.name, name, elements)
        self.nat.apply_or_render(change, drop=frozenset(m.mapping.host_port for m in mapped))

    def _flush_udp_conntrack(self, batch: list[PortMapping]) -> None:
        ports = [(m.external_port, m.host_address) for m in batch
                 if m.protocol is Protocol.UDP]
        if not ports:
            return
        try:
            flushed = self.flush_udp(ports)
        except (HnsError, NatError, OSError) as exc:  # the mapping works; old flows age out
            log.warning("could not flush stale UDP conntrack entries: %s", exc)
            return
        if flushed:
            log.debug("flushed %d stale UDP conntrack entries", flushed)

    def readd_remembered(self, vm: str) -> None:
        """Re-add what ``down`` remembered of the VM, except host ports taken since."""
        remembered = self.store.remembered_port_mappings(vm)
        if not remembered:
            return
        todo = []
        for m in remembered:
            taken = self.store.port_mapping_conflict(m.host_port)
            if taken is None:
                todo.append(m)
            elif taken.mapping != m:
                log.warning("port mapping %s not restored: %s", m.describe(),
                            portmap.conflict_message(m.host_port, taken))
        self.add_many(todo)
        with self.store.write() as tx:
            tx.forget_port_mappings(vm)
