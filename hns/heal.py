"""Putting the kernel back to what the state says: ``restore`` (everything, after a
reboot) and ``heal`` (what drifted, found by looking; the daemon's healer calls it).

The store is the source of truth.  ``heal`` reads the kernel cheaply first -- one dump of
the links this instance tagged, one of the host's addresses and routes, the list of
namespaces, the NAT table's listing, the VMs' resolv.conf files -- and, when asked
(``inside``), each NAT VM's eth0 (a netlink call inside its namespace).  A round that is
not ``full`` reads only what has no event: the namespaces and the resolv.conf files.  Only what
differs is repaired, each under the locks its command takes (network, then VM, then
nft), after reading the row again: an object deleted or stopped meanwhile is left alone,
and so is a row being created or deleted (its command owns it).  Each repair is a
:class:`Repair` (kind, object, why) for the log and the status.

What a user deleted through hns is not in the state any more, and a stopped VM is not
running in it: neither is ever brought back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hns.kernel_api import EndpointSpec
from hns.model import Network, Vm, resolver
from hns.naming import instance_alias_prefix

if TYPE_CHECKING:
    from hns.service import Service

__all__ = ["Reconciler", "Repair"]

log = logging.getLogger("hns")


@dataclass(frozen=True)
class Repair:
    kind: str            # bridge | nft | vm | veth | address | resolv
    what: str            # "network WSL", "vm wsl", "nft table inet hns-ab12"
    why: str

    def describe(self) -> str:
        return f"{self.what}: {self.why}"


class Reconciler:
    """``restore`` and ``heal`` of one :class:`~hns.service.Service` (a part of it)."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.store = svc.store

    # restore: everything

    def restore(self) -> list[str]:
        """Recreate every kernel object of the state (after a reboot); what was made.
        Objects whose create or delete was interrupted are left to that command (run
        again) or to ``gc``; stopped VMs stay stopped."""
        svc, made = self.svc, []
        networks = self.store.networks()
        for net in networks:
            if svc.ensure_bridge(net):
                made.append(f"bridge {net.bridge} of network {net.name}")
        if networks:
            svc.kernel.enable_forwarding()
            if any(n.mirrored for n in networks):
                svc.kernel.enable_forwarding6()
            svc.nat.sync()
        by_id = {n.id: n for n in networks}
        for listed in self.store.vms():
            with self.store.lock(f"vm-{listed.name}"):
                vm = self.store.find_vm(listed.name)   # deleted meanwhile: nothing to do
                if vm is None or vm.network_id not in by_id or not vm.running:
                    continue
                net = by_id[vm.network_id]
                if svc.kernel.netns_exists(vm.netns) and svc.kernel.link_exists(vm.host_ifname):
                    svc.kernel.attach_port(vm.host_ifname, net.bridge)
                    svc.configure_vm_side(vm, net)
                    continue
                svc.teardown_vm(vm)
                svc.apply_vm(vm, net)
                made.append(f"vm {vm.name} ({vm.ip}, {vm.mac})")
        if networks:
            svc.poke_daemon()     # mirrored VMs' tables were made again: their ports too
        return made

    # heal: what drifted

    def heal(self, full: bool = True, inside: bool = True) -> list[Repair]:
        """Repair what differs from the state; the repairs made.  ``full``: the host's
        links and addresses, the nft table and the namespaces too (else the VMs'
        resolv.conf only, what has no event); ``inside``: each NAT VM's eth0 as well."""
        networks = self.store.networks()
        if not networks:
            return []
        svc = self.svc
        links: dict[str, str] | None = None
        repairs: list[Repair] = []
        if full:
            links = svc.kernel.tagged_links(instance_alias_prefix(svc.instance_id))
            held = {holder for holder, _ in svc.kernel.inventory()}
            repairs += [r for net in networks if (r := self._heal_bridge(net, links, held))]
            why = svc.nat.drift()
            if why is not None:
                svc.nat.sync()
                repairs.append(Repair("nft", f"nft table inet {svc.nat.name}", why))
        namespaces = frozenset(svc.kernel.list_netns())
        by_id = {n.id: n for n in networks}
        for vm in self.store.vms():
            net = by_id.get(vm.network_id)
            if net is not None and vm.running:
                found = self._vm_drift(vm, net, namespaces, links, inside and full)
                if found is not None and self._repair_vm(vm.name, found):
                    repairs.append(Repair(found[0], f"vm {vm.name}", found[1]))
        if repairs:
            svc.poke_daemon()
        return repairs

    def _heal_bridge(self, net: Network, links: dict[str, str],
                     held: set[str]) -> Repair | None:
        address = f"{net.gateway}/{net.subnet.prefixlen}"
        if net.bridge not in links:
            why = f"bridge {net.bridge} was gone"
        elif f"address {address} on {net.bridge}" not in held:   # LinuxKernel.inventory's
            why = f"bridge {net.bridge} lost its address {address}"
        else:
            return None
        with self.store.lock(f"network-{net.name}", shared=True):
            if self.store.find_network(net.name) != net:
                return None                     # deleted or changed meanwhile
            self.svc.ensure_bridge(net)
            for vm in self.store.vms(net.id):   # veths fall off a deleted bridge
                if vm.running and self.svc.kernel.link_exists(vm.host_ifname):
                    self.svc.kernel.attach_port(vm.host_ifname, net.bridge)
        return Repair("bridge", f"network {net.name}", why)

    def _vm_drift(self, vm: Vm, net: Network, namespaces: frozenset[str],
                  links: dict[str, str] | None, inside: bool) -> tuple[str, str] | None:
        kernel = self.svc.kernel
        if vm.netns not in namespaces:
            return "vm", f"namespace {vm.netns} was gone"
        if links is not None and vm.host_ifname not in links:
            return "veth", f"veth {vm.host_ifname} was gone"
        if not kernel.vm_resolv_ok(vm.netns, resolver(vm, net), self.svc.instance_id):
            return "resolv", f"/etc/netns/{vm.netns}/resolv.conf was changed"
        if inside and not net.mirrored and \
                not kernel.vm_side_ok(vm.netns, vm.ip, vm.prefixlen, vm.gateway):
            return "address", f"eth0 lost its address {vm.ip}/{vm.prefixlen} or its route"
        return None

    def _repair_vm(self, name: str, found: tuple[str, str]) -> bool:
        """Repair VM ``name`` for ``found`` (kind, why); False if it is no longer there
        to repair (deleted, stopped or being changed)."""
        svc, kind = self.svc, found[0]
        with self.store.lock(f"vm-{name}"):
            vm = self.store.find_vm(name)
            net = self.store.find_network(vm.network) if vm is not None else None
            if vm is None or net is None or not vm.running:
                return False
            if kind == "vm":
                svc.teardown_vm(vm)
                svc.apply_vm(vm, net)
            elif kind == "veth":
                svc.kernel.add_endpoint(EndpointSpec(
                    host_ifname=vm.host_ifname, netns=vm.netns, mac=vm.mac, mtu=vm.mtu,
                    bridge=net.bridge, alias=svc.alias(vm.id)))
                svc.configure_vm_side(vm, net)
            elif kind == "resolv":
                svc.kernel.write_vm_resolv(vm.netns, resolver(vm, net), svc.instance_id)
            else:
                svc.configure_vm_side(vm, net)
        return True
