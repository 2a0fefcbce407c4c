"""``gc``: what interrupted commands and lost state left behind, removed.

Two kinds: objects whose create or delete was killed (their rows are incomplete; rolled
back unless a command holds their lock right now), and kernel objects that carry this
instance's full ID (:mod:`hns.leftovers`) but that no row names.  The nft tables are
removed only when no network needs them and their comment carries the ID.
"""

from __future__ import annotations

from collections.abc import Callable

from hns import leftovers, naming, resolv
from hns.kernel_api import Kernel
from hns.nat_table import NatTable
from hns.port_mappings import PortMappings
from hns.store import ANY_STATE, INCOMPLETE, Store
from nat.nft import NftRunner
from nat.transaction import Transaction

__all__ = ["Collector", "tag_in_use"]


def tag_in_use(tag: str, kernel: Kernel, nft: NftRunner) -> bool:
    """Whether kernel objects of instance tag ``tag`` exist (asked by a new state
    directory choosing its tag)."""
    return leftovers.tag_in_use(naming.netns_prefix(tag), f"inet {naming.nft_table_name(tag)}",
                                kernel.list_netns(), kernel.etc_netns_entries(),
                                nft.list_tables())


class Collector:
    """One ``gc`` run.  ``remove_vm(name)`` and ``finish_network(name)`` are the
    service's rollbacks (the caller holds the object's lock)."""

    def __init__(self, store: Store, nft: NftRunner, nat: NatTable, port_maps: PortMappings,
                 kernel: Kernel, instance_id: str, remove_vm: Callable[[str], object],
                 finish_network: Callable[[str], None]) -> None:
        self.store = store
        self.nft = nft
        self.nat = nat
        self.port_maps = port_maps
        self.kernel = kernel
        self.instance_id = instance_id
        self.remove_vm = remove_vm
        self.finish_network = finish_network
        self.owner_comment = f'comment "{nat.owner}"'

    def run(self, dry_run: bool = False) -> list[str]:
        """What was (``dry_run``: would be) removed, one line each."""
        found = self._incomplete(dry_run)
        rows_vms = self.store.vms(states=ANY_STATE)
        nets = self.store.networks(states=ANY_STATE)
        known_links = ({n.bridge for n in nets} | {v.host_ifname for v in rows_vms}
                       | {naming.vxlan_name(self.nat.instance, n.id) for n in nets if n.overlay})
        known_netns = {v.netns for v in rows_vms}
        prefix = naming.netns_prefix(self.nat.instance)
        ours = naming.instance_alias_prefix(self.instance_id)
        for link in leftovers.leftover_links(self.kernel.tagged_links(ours), known_links):
            found.append(f"link {link}")
            if not dry_run:
                self.kernel.delete_link(link)
        namespaces = [ns for ns in self.kernel.list_netns() if ns.startswith(prefix)]
        for ns in leftovers.leftover_netns({ns: self.kernel.netns_tag(ns) for ns in namespaces},
                                           known_netns, prefix, ours):
            found.append(f"netns {ns}")
            if not dry_run:
                self.kernel.kill_netns_processes(ns)
                self.kernel.delete_netns(ns)
        owners = {e: self.kernel.vm_resolv_owner(e) for e in self.kernel.etc_netns_entries()
                  if e.startswith(prefix)}
        live = self.kernel.list_netns()
        for entry in leftovers.leftover_resolv(owners, known_netns, live, prefix,
                                               self.instance_id):
            found.append(f"resolv.conf {resolv.ETC_NETNS}/{entry}")
            if not dry_run:
                self.kernel.remove_vm_resolv(entry)
        found.extend(self._tables(dry_run))
        return found

    def _incomplete(self, dry_run: bool) -> list[str]:
        """Objects whose create or delete was killed: rolled back, unless a command is
        working on them right now (it holds their lock)."""
        found: list[str] = []
        with self.nat.lock():
            pending = self.store.incomplete_port_mappings()
            for m in pending:
                found.append(f"incomplete port mapping {m.mapping.describe()}")
            if pending and not dry_run:
                self.port_maps.finish_incomplete()
        for vm in self.store.incomplete_vms():
            with self.store.try_lock(f"vm-{vm.name}") as free:
                if free and self.store.find_vm(vm.name, states=INCOMPLETE) is not None:
                    found.append(f"incomplete vm {vm.name}")
                    if not dry_run:
                        self.remove_vm(vm.name)
        for net in self.store.incomplete_networks():
            with self.store.try_lock(f"network-{net.name}") as free:
                if free and self.store.find_network(net.name, states=INCOMPLETE) is not None:
                    found.append(f"incomplete network {net.name}")
                    if not dry_run:
                        self.finish_network(net.name)
        return found

    def _tables(self, dry_run: bool) -> list[str]:
        """Our nft tables when no network needs them (only tables that carry our ID)."""
        found: list[str] = []
        name = self.nat.name
        tables = self.nft.list_tables()
        if f"inet {name}" in tables and not self.store.networks(states=ANY_STATE) and \
                self.owner_comment in (self.nft.list_table("inet", name) or ""):
            found.append(f"nft table inet {name}")
            if not dry_run:
                self.nat.sync()
        # the daemon's inbound table of mirrored networks, left by a daemon that was killed
        mirror = f"{name}-mirror"
        if f"inet {mirror}" in tables and not any(n.mirrored for n in self.store.networks()) \
                and self.owner_comment in (self.nft.list_table("inet", mirror) or ""):
            found.append(f"nft table inet {mirror}")
            if not dry_run:
                self.nft.run(Transaction().destroy_table("inet", mirror))
        # the daemon's fast table (docs/datapath.md), left by a daemon that was killed
        fast = f"{name}-fast"
        if f"inet {fast}" in tables and not self._daemon_runs() \
                and self.owner_comment in (self.nft.list_table("inet", fast) or ""):
            found.append(f"nft table inet {fast}")
            if not dry_run:
                self.nft.run(Transaction().destroy_table("inet", fast))
        return found

    def _daemon_runs(self) -> bool:
        from hns.daemon.daemon import DaemonLock
        return DaemonLock(self.store.state_dir).holder() is not None
