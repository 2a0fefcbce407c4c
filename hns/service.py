"""The service: what ``hnsctl`` and the Python API call.

Every create: validate (pure) -> one store transaction inserts the row marked
``creating`` -> the kernel work, idempotent -> the row marked ``ready``; on a failure the
kernel work is undone and the row deleted.  Every delete: the row marked ``deleting`` ->
the kernel, idempotent -> the row deleted.  Each object's create and delete hold its
lock (network -> VM -> nft), and a command that finds an object's row incomplete rolls
it back first (docs/design.md, "Crash safety").  Parts: :class:`~hns.nat_table.NatTable`,
:class:`~hns.port_mappings.PortMappings`; ``restore`` makes every kernel object of the
state again, ``gc`` (:mod:`hns.gc`) removes what the state does not know.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Interface
from typing import Any

from hns import ipam, naming, portmap, resolv
from hns.cluster.config import ClusterConfig
from hns.cluster.records import EndpointRecord
from hns.errors import AlreadyExists, Conflict, HnsError, InvalidRequest, KernelError
from hns.failpoint import failpoint
from hns.gc import Collector, tag_in_use
from hns.heal import Reconciler, Repair
from hns.kernel_api import EndpointSpec, Kernel
from hns.lifecycle import VmLifecycle
from hns.mirrored import mirror_spec, transit6_gateway
from hns.model import (
    Network,
    NetworkType,
    PortMapping,
    Protocol,
    Vm,
    parse_idle_timeout,
    parse_ipv4,
    parse_mac,
    parse_name,
    parse_netns_name,
    parse_network_options,
    resolver,
)
from hns.nat_table import NatTable
from hns.netns import netns_exists
from hns.nft import nft as hns_nft
from hns.overlay import Overlay
from hns.port_mappings import PortMappings
from hns.store import ANY_STATE, INCOMPLETE, Store
from hns.subnets import pick_subnet
from nat.nft import NftRunner

__all__ = ["DEFAULT_NETWORK", "DEFAULT_STATE_DIR", "DEFAULT_VM", "Service", "UpResult",
           "open_service"]

log = logging.getLogger("hns")

DEFAULT_STATE_DIR = "/var/lib/hns"
DEFAULT_NETWORK = "WSL"
DEFAULT_VM = "wsl"
DEFAULT_IDLE_TIMEOUT_MS = 60_000      # WSL's vmIdleTimeout


@dataclass(frozen=True)
class UpResult:
    network: Network
    vm: Vm
    created: bool


class Service:
    """hns bound to one state directory and one host namespace."""

    def __init__(self, state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR,
                 host_netns: str | None = None, *, nft: NftRunner | None = None,
                 kernel: Kernel | None = None, cluster: ClusterConfig | None = None) -> None:
        """``nft`` and ``kernel``: the seams (default: the real ones, in ``host_netns``;
        :class:`nat.fake.FakeNft` and :class:`hns.fake_kernel.FakeKernel` for tests);
        ``cluster``: the cluster this host is in (overlay networks), None: none."""
        if host_netns is not None:
            parse_netns_name(host_netns, "host namespace")
            if not (kernel.netns_exists(host_netns) if kernel else netns_exists(host_netns)):
                raise InvalidRequest(f"host namespace {host_netns!r} does not exist")
        self.host_netns = host_netns
        self.nft: NftRunner = nft or hns_nft(host_netns)
        self._kernel: Kernel | None = kernel
        self.store = Store(state_dir, tag_taken=self._tag_taken)
        self.instance = self.store.instance
        self.instance_id = self.store.instance_id
        self.nat = NatTable(self.store, self.nft, self.instance, self._owner)
        self.port_maps = PortMappings(self.store, self.nat, self._flush_udp)
        self.reconciler = Reconciler(self)
        self.overlay = Overlay(self, cluster)
        self.lifecycle = VmLifecycle(self.store, lambda: self.kernel, self.nat, self.apply_vm,
                                     self.teardown_vm, self.poke_daemon)

    def _tag_taken(self, tag: str) -> bool:
        return tag_in_use(tag, self.kernel, self.nft)

    def alias(self, object_id: str) -> str:
        """The tag of a kernel object: this instance's full ID and the object's."""
        return naming.link_alias(self.instance_id, object_id)

    @property
    def _owner(self) -> str:
        return naming.instance_alias_prefix(self.instance_id).rstrip(":")

    def _flush_udp(self, ports: list[tuple[int, IPv4Address | None]]) -> int:
        """Stale UDP conntrack entries of the host namespace (netlink, on its thread)."""
        from nat.conntrack import flush_udp
        return self.kernel.run(flush_udp, ports)

    @property
    def kernel(self) -> Kernel:
        if self._kernel is None:
            from hns.kernel import LinuxKernel
            self._kernel = LinuxKernel(self.host_netns)
        return self._kernel

    def close(self) -> None:
        self.overlay.close()
        if self._kernel is not None:
            self._kernel.close()
            self._kernel = None
        self.store.close()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # reads

    def list_networks(self) -> list[Network]:
        return self.store.networks()

    def get_network(self, name: str) -> Network:
        return self.store.network(name)

    def list_vms(self, network: str | None = None) -> list[Vm]:
        net_id = self.store.network(network).id if network else None
        return portmap.with_policies(self.store.vms(net_id), self.store.port_mappings())

    def get_vm(self, name: str) -> Vm:
        vm = self.store.vm(name)
        return portmap.with_policies([vm], self.store.port_mappings(vm.id))[0]

    # port mappings (hns.port_mappings)

    def list_port_mappings(self, vm: str | None = None) -> list[PortMapping]:
        return self.port_maps.listed(vm)

    def add_port_mapping(self, vm: str, protocol: Protocol | str, external_port: int | str,
                         internal_port: int | str,
                         host_address: IPv4Address | str | None = None) -> PortMapping:
        """Forward host ``protocol``/``external_port`` (on ``host_address``, or every host
        address) to ``internal_port`` of the VM."""
        return self.port_maps.add(vm, protocol, external_port, internal_port, host_address)

    def add_port_mappings(self, mappings: Iterable[PortMapping]) -> list[PortMapping]:
        """Add mappings, all or none: one store and one nft transaction."""
        return self.port_maps.add_many(mappings)

    def delete_port_mapping(self, vm: str, protocol: Protocol | str, external_port: int | str,
                            host_address: IPv4Address | str | None = None) -> bool:
        """Delete the VM's mapping of that host port; False if there is none."""
        return self.port_maps.delete(vm, protocol, external_port, host_address)

    # networks

    def _host_prefixes(self) -> list[tuple[str, IPv4Network]]:
        ours = frozenset(n.bridge for n in self.store.networks())
        taken = self.kernel.inventory(skip_links=ours)
        with contextlib.suppress(OSError), open(resolv.host_resolv_path(self.host_netns)) as f:
            for ns in resolv.nameservers(f.read()):
                with contextlib.suppress(ValueError):
                    taken.append((f"nameserver {ns}", IPv4Network(ns)))
        return taken

    def create_network(self, name: str, type: NetworkType | str = NetworkType.NAT,
                       subnet: IPv4Network | str | None = None,
                       gateway: IPv4Address | str | None = None,
                       mtu: int | str | None = None,
                       localhost_forwarding: bool = True,
                       ignored_ports: str | tuple[int, ...] | None = None,
                       host_address_loopback: bool | None = None,
                       firewall: bool = True, dns_proxy: bool = True,
                       vni: int | str | None = None) -> Network:
        """A NAT network, or a mirrored one (``type`` "mirrored": the VMs share the host's
        addresses; ``ignored_ports`` and ``host_address_loopback`` are for it only).
        ``firewall`` (WSL's): nothing unsolicited is forwarded into the VMs; a mirrored
        network always has it.  ``dns_proxy`` off: the VMs use the host's resolvers.
        ``type`` "overlay": a network of the whole cluster (``vni``: its VXLAN ID)."""
        name = parse_name(name, "network name")
        opts = parse_network_options(type, subnet, gateway, mtu, ignored_ports,
                                     host_address_loopback)
        if vni is not None and opts.type is not NetworkType.OVERLAY:
            raise InvalidRequest("--vni is for overlay networks")
        if opts.type is NetworkType.OVERLAY:
            net = self.overlay.create_network(name, opts, mtu is not None, vni)
            self.poke_daemon()
            return net
        mirrored, pinned, gw = opts.type is NetworkType.MIRRORED, opts.subnet, opts.gateway
        with self.store.lock(f"network-{name}"):
            self._finish_network(name)
            if self.store.find_network(name) is not None:
                raise AlreadyExists(f"network {name!r} already exists")
            host_taken = self._host_prefixes()
            with self.store.write() as tx:
                if self.store.find_network(name, ANY_STATE) is not None:
                    raise AlreadyExists(f"network {name!r} already exists")
                others = [(f"network {n.name}", n.subnet)
                          for n in self.store.networks(ANY_STATE)]
                chosen = pick_subnet(name, mirrored, pinned, others, host_taken,
                                     self.store.remembered_subnet(name))
                net_id = str(uuid.uuid4())
                net = Network(id=net_id, name=name, type=opts.type, subnet=chosen,
                              gateway=gw or ipam.default_gateway(chosen), mtu=opts.mtu,
                              bridge=naming.bridge_name(self.instance, net_id),
                              localhost_forwarding=bool(localhost_forwarding),
                              ignored_ports=opts.ignored_ports,
                              host_address_loopback=bool(host_address_loopback),
                              firewall=bool(firewall) or mirrored, dns_proxy=bool(dns_proxy))
                tx.insert_network(net, "creating")
            failpoint("network-create:after-store")
            self._make_network(net)
        self.poke_daemon()
        return net

    def _make_network(self, net: Network) -> None:
        """The kernel objects of ``net``, whose row is ``creating``; then ``ready``, or
        everything undone on a failure."""
        try:
            self._apply_network(net)
            with self.store.write() as tx:
                tx.set_state("network", net.id, "ready")
        except BaseException:
            self._undo_network(net)
            raise

    def _apply_network(self, net: Network) -> None:
        self.ensure_bridge(net)
        failpoint("network-create:after-bridge")
        self.kernel.enable_forwarding()
        if net.mirrored:
            self.kernel.enable_forwarding6()
        self.nat.sync()
        failpoint("network-create:after-nft")

    def add_network(self, net: Network) -> None:
        """Make ``net`` on this host: its row, then its kernel objects (the caller holds
        the network's lock; an overlay network adopted from the cluster comes here)."""
        with self.store.write() as tx:
            tx.insert_network(net, "creating")
        self._make_network(net)

    def ensure_bridge(self, net: Network) -> bool:
        made = self.kernel.ensure_bridge(net.bridge, net.gateway, net.subnet.prefixlen,
                                         net.mtu, self.alias(net.id),
                                         naming.bridge_mac(net.id))
        if net.overlay:
            self.overlay.apply_network(net)
        if net.mirrored:
            self.kernel.ensure_address6(net.bridge, IPv6Interface(
                f"{transit6_gateway(self.instance, net.subnet)}/64"))
        return made

    def _undo_network(self, net: Network) -> None:
        """Remove a network whatever state it is in (its VMs' rows go with it)."""
        with contextlib.suppress(HnsError):
            self.kernel.delete_link(net.bridge)
            self._delete_vxlan(net)
        with self.nat.lock():
            with self.store.write() as tx:
                tx.delete_network(net.id)
            with contextlib.suppress(HnsError):
                self.nat.sync_locked()

    def _delete_vxlan(self, net: Network) -> None:
        if net.overlay:
            self.kernel.delete_link(naming.vxlan_name(self.instance, net.id))

    def _finish_network(self, name: str) -> None:
        """Roll back what a killed create or delete of network ``name`` left (the caller
        holds the network's lock, so no command is working on it now)."""
        net = self.store.find_network(name, states=INCOMPLETE)
        if net is None:
            return
        log.info("network %s: removing what an interrupted create or delete left", name)
        for vm in self.store.vms(net.id, states=ANY_STATE):
            self._delete_vm(vm.name, remember=False)
        self._undo_network(net)

    def delete_network(self, name: str, force: bool = False) -> bool:
        """Delete a network; False if it did not exist.  Refuses while VMs are attached."""
        name = parse_name(name, "network name")
        with self.store.lock(f"network-{name}"):
            net = self.store.find_network(name)
            if net is None:
                if self.store.find_network(name, states=INCOMPLETE) is None:
                    return False
                self._finish_network(name)
                self.poke_daemon()
                return True
            if self.store.vms(net.id) and not force:
                names = ", ".join(v.name for v in self.store.vms(net.id))
                raise Conflict(f"network {name!r} has VMs attached ({names}); delete them "
                               "first or use --force")
            if net.overlay:
                self.overlay.state.check_deletable(net.name)   # before anything changes
                for vm in self.store.vms(net.id, states=ANY_STATE):
                    self.overlay.release(vm, strict=True)
                self.overlay.delete_network(net)
            for vm in self.store.vms(net.id, states=ANY_STATE):
                self._delete_vm(vm.name, remember=False)
            with self.store.write() as tx:
                tx.set_state("network", net.id, "deleting")
            failpoint("network-delete:after-mark")
            with self.nat.lock():
                self.nat.sync_locked()        # a network being deleted is left out
                failpoint("network-delete:after-nft")
                self.kernel.delete_link(net.bridge)
                self._delete_vxlan(net)
                failpoint("network-delete:after-bridge")
                with self.store.write() as tx:
                    tx.delete_network(net.id)
        self.poke_daemon()
        return True

    # VMs

    def create_vm(self, name: str, network: str, ip: IPv4Address | str | None = None,
                  mac: str | None = None, idle_timeout_ms: int | str | None = None) -> Vm:
        """``idle_timeout_ms``: the daemon stops the VM after this long idle (None or
        -1: never, the default)."""
        name = parse_name(name, "vm name")
        idle = parse_idle_timeout(idle_timeout_ms)
        network = parse_name(network, "network name")
        want_ip = parse_ipv4(str(ip)) if ip is not None else None
        want_mac = parse_mac(mac) if mac is not None else None
        # lock order, everywhere: the network, then the VM, then nft
        self.overlay.local_network(network)      # an overlay network only etcd has yet
        with self.store.lock(f"network-{network}", shared=True), \
                self.store.lock(f"vm-{name}"):
            self._finish_vm(name)
            net, vm_id = self.store.network(network), str(uuid.uuid4())
            if self.store.find_vm(name, ANY_STATE) is not None:
                raise AlreadyExists(f"vm {name!r} already exists")
            if net.overlay and want_mac is not None:
                raise InvalidRequest("an overlay VM's MAC follows from its address: drop --mac")
            endpoint = (self.overlay.allocate(net, name, vm_id, want_ip)   # etcd's CAS
                        if net.overlay else None)
            with self.store.write() as tx, self._releasing(endpoint, vm_id):
                if self.store.find_vm(name, ANY_STATE) is not None:
                    raise AlreadyExists(f"vm {name!r} already exists")
                addr = endpoint.ip if endpoint else ipam.allocate_ip(
                    net.subnet, net.gateway, self.store.taken_ips(net.id), want_ip)
                hw = ipam.allocate_mac(self.store.taken_macs(),
                                       endpoint.mac if endpoint else want_mac)
                vm = Vm(id=vm_id, name=name, network=net.name, network_id=net.id,
                        netns=naming.vm_netns_name(self.instance, name), ip=addr,
                        prefixlen=net.subnet.prefixlen, gateway=net.gateway, mac=hw,
                        host_ifname=naming.host_veth_name(self.instance, vm_id), mtu=net.mtu,
                        idle_timeout_ms=idle)
                tx.insert_vm(vm, "creating")
            failpoint("vm-create:after-store")
            try:
                self.apply_vm(vm, net, "vm-create")
                with self.store.write() as tx:
                    tx.set_state("vm", vm.id, "ready")
            except BaseException:
                with contextlib.suppress(HnsError, OSError):
                    self.teardown_vm(vm)
                with self.store.write() as tx:
                    tx.delete_vm(vm.id)
                if net.overlay:
                    self.overlay.release(vm, strict=False)
                raise
        self.poke_daemon()
        return vm

    @contextlib.contextmanager
    def _releasing(self, endpoint: EndpointRecord | None, vm_id: str) -> Iterator[None]:
        """An overlay VM's endpoint record is deleted again if its row is not made."""
        try:
            yield
        except BaseException:
            if endpoint is not None:
                with contextlib.suppress(HnsError):
                    self.overlay.state.release(endpoint.network, endpoint.ip, vm_id)
            raise

    def _finish_vm(self, name: str) -> None:
        """Roll back what a killed create or delete of VM ``name`` left (the caller holds
        the VM's lock, so no command is working on it now)."""
        if self.store.find_vm(name, states=INCOMPLETE) is not None:
            log.info("vm %s: removing what an interrupted create or delete left", name)
            self._remove_vm(name, remember=False)

    def apply_vm(self, vm: Vm, net: Network, op: str = "restore") -> None:
        try:
            self.kernel.create_netns(vm.netns)
        except KernelError as exc:
            if exc.is_exists:
                raise KernelError(f"network namespace {vm.netns} already exists; "
                                  "'hnsctl gc' removes leftovers", exc.errno) from None
            raise
        self.kernel.tag_netns(vm.netns, self.alias(vm.id))
        failpoint(f"{op}:after-netns")
        self.kernel.add_endpoint(EndpointSpec(
            host_ifname=vm.host_ifname, netns=vm.netns, mac=vm.mac, mtu=vm.mtu,
            bridge=net.bridge, alias=self.alias(vm.id)))
        failpoint(f"{op}:after-veth")
        self.configure_vm_side(vm, net)
        failpoint(f"{op}:after-config")

    def configure_vm_side(self, vm: Vm, net: Network) -> None:
        if net.mirrored:
            ours = frozenset(n.bridge for n in self.store.networks())
            spec = mirror_spec(vm, self.instance, self.kernel.host_view(skip_links=ours))
            self.kernel.configure_mirrored_vm(spec, vm.interface)
        else:
            self.kernel.configure_vm_side(vm.netns, vm.ip, vm.prefixlen, vm.gateway)
        self.kernel.write_vm_resolv(vm.netns, resolver(vm, net), self.instance_id)

    def poke_daemon(self) -> None:
        """Tell a running daemon to reload now (it watches the VMs for localhost
        forwarding).  Best effort: a daemon also notices within a second on its own."""
        from hns.daemon.control import poke
        poke(self.store.state_dir)

    def teardown_vm(self, vm: Vm) -> None:
        self.kernel.kill_netns_processes(vm.netns)
        self.kernel.delete_link(vm.host_ifname)
        self.kernel.delete_netns(vm.netns)
        self.kernel.remove_vm_resolv(vm.netns)

    def delete_vm(self, name: str, *, remember: bool = False) -> bool:
        """Delete a VM and everything it had (port mappings too; ``remember``: keep
        copies of them under its name, as ``down`` does); False if it did not exist."""
        return self._delete_vm(parse_name(name, "vm name"), remember=remember)

    def _delete_vm(self, name: str, remember: bool) -> bool:
        """``remember``: keep copies of its port mappings under its name (``down``)."""
        with self.store.lock(f"vm-{name}"):
            vm = self.store.find_vm(name, states=ANY_STATE)
            net = self.store.find_network(vm.network, ANY_STATE) if vm else None
            if vm is not None and net is not None and net.overlay:
                self.overlay.release(vm, strict=True)     # etcd first: it may refuse
            return self._remove_vm(name, remember)

    def _remove_vm(self, name: str, remember: bool) -> bool:
        """Delete VM ``name`` in whatever state (the caller holds its lock): marked
        ``deleting`` first (so no render and no reader sees its mappings any more), then
        nft, then the kernel, then the row."""
        vm = self.store.find_vm(name, states=ANY_STATE)
        if vm is None:
            return False
        complete = self.store.find_vm(name) is not None
        with self.nat.lock():
            mapped = self.store.vm_port_mappings(vm.id)
            with self.store.write() as tx:
                if not remember:      # a deleted VM's mappings are gone, remembered ones too
                    tx.forget_port_mappings(vm.name)
                elif complete:
                    tx.remember_port_mappings(vm.name, [
                        m.mapping for m in self.store.port_mappings(vm.id)])
                tx.set_state("vm", vm.id, "deleting")
            failpoint("vm-delete:after-mark")
            if mapped:
                self.port_maps.remove(mapped)
            failpoint("vm-delete:after-nft")
        self.teardown_vm(vm)
        failpoint("vm-delete:after-kernel")
        with self.store.write() as tx:
            tx.delete_vm(vm.id)  # its mappings go with it (cascade)
        self.poke_daemon()
        return True

    # lifecycle

    def up(self, mode: NetworkType | str = NetworkType.NAT, *,
           idle_timeout_ms: int | None = DEFAULT_IDLE_TIMEOUT_MS,
           network_options: Mapping[str, Any] | None = None) -> UpResult:
        """WSL's first start (:func:`hns.wsl.up`)."""
        from hns import wsl
        return wsl.up(self, mode, idle_timeout_ms, network_options)

    def down(self) -> list[str]:
        """Remove ``wsl`` and ``WSL``; what was removed (:func:`hns.wsl.down`)."""
        from hns import wsl
        return wsl.down(self)

    def restore(self) -> list[str]:
        """Recreate every kernel object of the state (after a reboot); what was made
        (:class:`hns.heal.Reconciler`)."""
        return self.reconciler.restore()

    def heal(self, full: bool = True, inside: bool = True) -> list[Repair]:
        """Repair what drifted from the state; the repairs (:mod:`hns.heal`)."""
        return self.reconciler.heal(full, inside)

    def set_network_options(self, name: str, **options: Any) -> Network:
        """Change what a network may change while it lives (``localhost_forwarding``,
        ``ignored_ports``, ``host_address_loopback``); the daemon follows."""
        with self.store.lock(f"network-{parse_name(name, 'network name')}"), \
                self.store.write() as tx:
            tx.set_network_options(dataclasses.replace(self.store.network(name), **options))
        self.poke_daemon()
        return self.store.network(name)

    def set_idle_timeout(self, name: str, idle_timeout_ms: int | str | None) -> Vm:
        idle = parse_idle_timeout(idle_timeout_ms)
        with self.store.lock(f"vm-{parse_name(name, 'vm name')}"), self.store.write() as tx:
            vm = self.store.vm(name)
            tx.set_idle_timeout(vm.id, idle)
        self.poke_daemon()
        return self.store.vm(name)

    def stop_vm(self, name: str) -> bool:
        return self.lifecycle.stop(name)

    def start_vm(self, name: str) -> bool:
        return self.lifecycle.start(name)

    def vm_state(self, vm: Vm) -> str:
        return self.lifecycle.state(vm)

    def gc(self, dry_run: bool = False) -> list[str]:
        """Remove what interrupted commands left (incomplete objects no command is
        working on), and kernel objects carrying this instance's ID that the state does
        not know (:mod:`hns.gc`)."""
        return Collector(self.store, self.nft, self.nat, self.port_maps, self.kernel,
                         self.instance_id, lambda name: self._remove_vm(name, remember=False),
                         self._finish_network).run(dry_run)


@contextlib.contextmanager
def open_service(state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR,
                 host_netns: str | None = None) -> Iterator[Service]:
    service = Service(state_dir, host_netns)
    try:
        yield service
    finally:
        service.close()

