"""The service: what ``hnsctl`` and the Python API call.

Every operation follows one pattern: validate (pure) -> write the desired state in one
store transaction -> apply it to the kernel idempotently -> on failure undo the kernel
work made so far (an ExitStack of undo callbacks) and the state row.  Deletes run the
other way round: kernel first (idempotent), then the state, so a failed delete can simply
be run again.  ``restore`` rebuilds every kernel object from the state; ``gc`` removes
kernel objects tagged with this instance that the state does not know.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Interface
from typing import TYPE_CHECKING

from hns import ipam, naming, portmap, resolv
from hns._portmap_ops import PortMappingOps
from hns.errors import AlreadyExists, Conflict, HnsError, InvalidRequest, KernelError
from hns.mirrored import (
    TRANSIT_POOL,
    TRANSIT_PREFIXLEN,
    mirror_spec,
    transit6_gateway,
    transit6_subnet,
)
from hns.model import (
    DEFAULT_MTU,
    HostPort,
    Network,
    NetworkType,
    Vm,
    parse_ipv4,
    parse_mac,
    parse_mtu,
    parse_name,
    parse_netns_name,
    parse_port,
    parse_port_list,
    parse_subnet,
)
from hns.netns import create_netns, delete_netns, list_netns, netns_exists
from hns.store import MappedPort, Store
from nat.mirror import apply_vm_table
from nat.nft import Nft, NftRunner
from nat.ruleset import (
    NatSpec,
    nat_table,
    render_delete,
    render_replace,
)

if TYPE_CHECKING:  # the kernel driver (and pyroute2) loads on first use: reads stay fast
    from hns.kernel import HostKernel

__all__ = ["DEFAULT_NETWORK", "DEFAULT_STATE_DIR", "DEFAULT_VM", "Service", "UpResult",
           "open_service"]

log = logging.getLogger("hns")

DEFAULT_STATE_DIR = "/var/lib/hns"
DEFAULT_NETWORK = "WSL"
DEFAULT_VM = "wsl"


@dataclass(frozen=True)
class UpResult:
    network: Network
    vm: Vm
    created: bool


class Service(PortMappingOps):
    """hns bound to one state directory and one host namespace."""

    def __init__(self, state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR,
                 host_netns: str | None = None, *, nft: NftRunner | None = None) -> None:
        if host_netns is not None and not netns_exists(
                parse_netns_name(host_netns, "host namespace")):
            raise InvalidRequest(f"host namespace {host_netns!r} does not exist")
        self.host_netns = host_netns
        self.store = Store(state_dir)
        self.instance = self.store.instance
        self.nft: NftRunner = nft or Nft(host_netns)
        self._kernel: HostKernel | None = None

    @property
    def kernel(self) -> HostKernel:
        if self._kernel is None:
            from hns.kernel import HostKernel
            self._kernel = HostKernel(self.host_netns)
        return self._kernel

    def close(self) -> None:
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
        return self._with_policies(self.store.vms(net_id), self.store.port_mappings())

    def get_vm(self, name: str) -> Vm:
        vm = self.store.vm(name)
        return self._with_policies([vm], self.store.port_mappings(vm.id))[0]

    @staticmethod
    def _with_policies(vms: list[Vm], mapped: list[MappedPort]) -> list[Vm]:
        """The VMs with their port mappings as HNS endpoint policies."""
        policies: dict[str, list[dict[str, object]]] = defaultdict(list)
        for m in mapped:
            policies[m.mapping.vm].append(m.mapping.to_policy())
        return [dataclasses.replace(vm, policies=tuple(policies[vm.name])) for vm in vms]

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
                       firewall: bool = True) -> Network:
        """A NAT network, or a mirrored one (``type`` "mirrored": the VMs share the host's
        addresses; ``ignored_ports`` and ``host_address_loopback`` are for it only).
        ``firewall`` (WSL's): nothing unsolicited is forwarded into the VMs; a mirrored
        network always has it."""
        name = parse_name(name, "network name")
        net_type = type if isinstance(type, NetworkType) else NetworkType.parse(type)
        mirrored = net_type is NetworkType.MIRRORED
        if not mirrored and (ignored_ports is not None or host_address_loopback is not None):
            raise InvalidRequest("--ignored-ports and --host-address-loopback are for "
                                 "mirrored networks")
        if mirrored and (subnet is not None or gateway is not None):
            raise InvalidRequest("a mirrored network has no subnet of its own: its VMs have "
                                 "the host's addresses (drop --subnet and --gateway)")
        ignored = (parse_port_list(ignored_ports, "ignored ports")
                   if isinstance(ignored_ports, str) or ignored_ports is None
                   else tuple(sorted({parse_port(p, "ignored port") for p in ignored_ports})))
        pinned = parse_subnet(str(subnet)) if subnet is not None else None
        gw = parse_ipv4(str(gateway), "gateway") if gateway is not None else None
        if gw is not None and pinned is None:
            raise InvalidRequest("--gateway needs --subnet")
        if pinned is not None and gw is not None:
            ipam.validate_gateway(pinned, gw)
        size = parse_mtu(mtu) if mtu is not None else DEFAULT_MTU
        if self.store.find_network(name) is not None:
            raise AlreadyExists(f"network {name!r} already exists")
        host_taken = self._host_prefixes()
        with self.store.transaction() as db:
            if self.store.find_network(name, db) is not None:
                raise AlreadyExists(f"network {name!r} already exists")
            others = [(f"network {n.name}", n.subnet) for n in self.store.networks(db)]
            if pinned is not None:
                ipam.check_subnet_free(pinned, others + host_taken)
                chosen = pinned
            else:
                remembered = self.store.remembered_subnet(name, db)
                if remembered is not None and mirrored != remembered.subnet_of(TRANSIT_POOL):
                    remembered = None   # the name was used for a network of the other type
                choice = self._choose_subnet(mirrored, others, host_taken, remembered)
                chosen = choice.subnet
                if choice.replaced is not None:
                    log.warning("the address range %s remembered for network %s collides with "
                                "the host; created the network with range %s instead",
                                choice.replaced, name, chosen)
            net_id = str(uuid.uuid4())
            net = Network(id=net_id, name=name, type=net_type, subnet=chosen,
                          gateway=gw or ipam.default_gateway(chosen), mtu=size,
                          bridge=naming.bridge_name(self.instance, net_id),
                          localhost_forwarding=bool(localhost_forwarding),
                          ignored_ports=ignored, host_address_loopback=bool(host_address_loopback),
                          firewall=bool(firewall) or mirrored)
            self.store.insert_network(db, net)
        try:
            self._apply_network(net)
        except BaseException:
            self._undo_network(net)
            raise
        self._poke_daemon()
        return net

    @staticmethod
    def _choose_subnet(mirrored: bool, others: list[tuple[str, IPv4Network]],
                       host_taken: list[tuple[str, IPv4Network]],
                       remembered: IPv4Network | None) -> ipam.SubnetChoice:
        if not mirrored:
            return ipam.choose_subnet([n for _, n in others + host_taken], remembered)
        # A transit /24's own route is more specific than a wider host route (the
        # link-local 169.254.0.0/16 that NetworkManager and avahi add): only the host's
        # prefixes as specific as the /24, and its own addresses, take a /24.
        taken = [n for _, n in others] + [n for _, n in host_taken
                                          if n.prefixlen >= TRANSIT_PREFIXLEN]
        try:
            return ipam.choose_subnet(taken, remembered, (TRANSIT_POOL,), TRANSIT_PREFIXLEN)
        except Conflict:
            raise Conflict(f"no free /{TRANSIT_PREFIXLEN} left in {TRANSIT_POOL} for the "
                           "transit network of a mirrored network") from None

    def _apply_network(self, net: Network) -> None:
        self._ensure_bridge(net)
        self.kernel.enable_forwarding()
        if net.mirrored:
            self.kernel.enable_forwarding6()
        self._sync_nat()

    def _ensure_bridge(self, net: Network) -> bool:
        made = self.kernel.ensure_bridge(net.bridge, net.gateway, net.subnet.prefixlen,
                                         net.mtu, naming.link_alias(self.instance, net.id),
                                         naming.bridge_mac(net.id))
        if net.mirrored:
            self.kernel.ensure_address6(net.bridge, IPv6Interface(
                f"{transit6_gateway(self.instance, net.subnet)}/64"))
        return made

    def _undo_network(self, net: Network) -> None:
        with contextlib.suppress(HnsError):
            self.kernel.delete_link(net.bridge)
        with self.store.lock("nft"):
            with self.store.transaction() as db:
                self.store.delete_network(db, net.id)
            with contextlib.suppress(HnsError):
                self._sync_nat_locked()

    def _sync_nat(self) -> None:
        with self.store.lock("nft"):
            self._sync_nat_locked()

    def _sync_nat_locked(self, exclude: frozenset[str] = frozenset(),
                         drop: frozenset[HostPort] = frozenset()) -> None:
        """Render the whole NAT table from the state and apply it atomically; leave out
        the networks in ``exclude`` and the port mappings of the host ports in ``drop``."""
        table_name = naming.nft_table_name(self.instance)
        specs = [NatSpec(n.id, n.subnet, n.bridge,
                         transit6_subnet(self.instance, n.subnet) if n.mirrored else None,
                         isolated=n.firewall or n.mirrored)
                 for n in self.store.networks() if n.id not in exclude]
        if specs:
            ids = {s.id for s in specs}
            mapped = portmap.specs(m for m in self.store.port_mappings()
                                   if m.network_id in ids and m.mapping.host_port not in drop)
            self.nft.apply(render_replace(nat_table(table_name, specs, mapped)))
        else:
            self.nft.apply(render_delete("inet", table_name))

    def delete_network(self, name: str, force: bool = False) -> bool:
        """Delete a network; False if it did not exist.  Refuses while VMs are attached."""
        net = self.store.find_network(name)
        if net is None:
            return False
        vms = self.store.vms(net.id)
        if vms and not force:
            names = ", ".join(v.name for v in vms)
            raise Conflict(f"network {name!r} has VMs attached ({names}); delete them first "
                           "or use --force")
        for vm in vms:
            self.delete_vm(vm.name)
        with self.store.lock("nft"):
            self._sync_nat_locked(exclude=frozenset({net.id}))
            self.kernel.delete_link(net.bridge)
            with self.store.transaction() as db:
                self.store.delete_network(db, net.id)
        self._poke_daemon()
        return True

    # VMs

    def create_vm(self, name: str, network: str, ip: IPv4Address | str | None = None,
                  mac: str | None = None) -> Vm:
        name = parse_name(name, "vm name")
        want_ip = parse_ipv4(str(ip)) if ip is not None else None
        want_mac = parse_mac(mac) if mac is not None else None
        with self.store.transaction() as db:
            net = self.store.network(network, db)
            if self.store.find_vm(name, db) is not None:
                raise AlreadyExists(f"vm {name!r} already exists")
            addr = ipam.allocate_ip(net.subnet, net.gateway, self.store.taken_ips(db, net.id),
                                    want_ip)
            hw = ipam.allocate_mac(self.store.taken_macs(db), want_mac)
            vm_id = str(uuid.uuid4())
            vm = Vm(id=vm_id, name=name, network=net.name, network_id=net.id,
                    netns=naming.vm_netns_name(self.instance, name), ip=addr,
                    prefixlen=net.subnet.prefixlen, gateway=net.gateway, mac=hw,
                    host_ifname=naming.host_veth_name(self.instance, vm_id), mtu=net.mtu)
            self.store.insert_vm(db, vm)
        try:
            self._apply_vm(vm, net)
        except BaseException:
            with contextlib.suppress(HnsError, OSError):
                self._teardown_vm(vm)
            with self.store.transaction() as db:
                self.store.delete_vm(db, vm.id)
            raise
        self._poke_daemon()
        return vm

    def _apply_vm(self, vm: Vm, net: Network) -> None:
        from hns.kernel import EndpointSpec
        try:
            create_netns(vm.netns)
        except KernelError as exc:
            if exc.is_exists:
                raise KernelError(f"network namespace {vm.netns} already exists; "
                                  "'hnsctl gc' removes leftovers", exc.errno) from None
            raise
        self.kernel.add_endpoint(EndpointSpec(
            host_ifname=vm.host_ifname, netns=vm.netns, mac=vm.mac, mtu=vm.mtu,
            bridge=net.bridge, alias=naming.link_alias(self.instance, vm.id)))
        self._configure_vm_side(vm, net)

    def _configure_vm_side(self, vm: Vm, net: Network) -> None:
        from hns.kernel import configure_mirrored_vm, configure_vm_side
        if net.mirrored:
            ours = frozenset(n.bridge for n in self.store.networks())
            spec = mirror_spec(vm, self.instance, self.kernel.host_view(skip_links=ours))
            configure_mirrored_vm(spec)
            apply_vm_table(vm.interface, spec)
        else:
            configure_vm_side(vm.netns, vm.ip, vm.prefixlen, vm.gateway)
        resolv.write_vm_resolv(vm.netns, self.host_netns, vm.gateway)

    def _poke_daemon(self) -> None:
        """Tell a running daemon to reload now (it watches the VMs for localhost
        forwarding).  Best effort: a daemon also notices within a second on its own."""
        from portproxy.control import request
        with contextlib.suppress(OSError, ValueError):
            request(self.store.state_dir, "reload", timeout=1.0)

    def _teardown_vm(self, vm: Vm) -> None:
        from hns.kernel import kill_netns_processes
        kill_netns_processes(vm.netns)
        self.kernel.delete_link(vm.host_ifname)
        delete_netns(vm.netns)
        resolv.remove_vm_resolv(vm.netns)

    def delete_vm(self, name: str) -> bool:
        """Delete a VM and everything it had (port mappings too); False if it did not
        exist."""
        return self._delete_vm(name, remember=False)

    def _delete_vm(self, name: str, remember: bool) -> bool:
        """``remember``: keep copies of its port mappings under its name (``down``)."""
        with self.store.lock("nft"):  # no full render between the nft and state changes
            vm = self.store.find_vm(name)
            if vm is None:
                return False
            mapped = self.store.port_mappings(vm.id)
            if mapped:
                self._remove_port_mappings(mapped)
            self._teardown_vm(vm)
            with self.store.transaction() as db:
                if remember:
                    self.store.remember_port_mappings(db, vm.name, [m.mapping for m in mapped])
                else:  # a deleted VM's mappings are gone, remembered ones too
                    self.store.forget_port_mappings(db, vm.name)
                self.store.delete_vm(db, vm.id)  # its mappings go with it (cascade)
        self._poke_daemon()
        return True

    # lifecycle

    def up(self, mode: NetworkType | str = NetworkType.NAT) -> UpResult:
        """WSL's first start: the network ``WSL`` (NAT, or mirrored: WSL's
        ``networkingMode``) and the VM ``wsl``.  Idempotent; a network ``WSL`` of the
        other type is a conflict (``down`` first)."""
        want = mode if isinstance(mode, NetworkType) else NetworkType.parse(mode)
        net = self.store.find_network(DEFAULT_NETWORK)
        if net is not None and net.type is not want:
            raise Conflict(f"network {DEFAULT_NETWORK} is {net.type.value.lower()}, not "
                           f"{want.value.lower()}: run 'hnsctl down' first")
        self.restore()
        created = False
        if net is None:
            net = self.create_network(DEFAULT_NETWORK, want)
            created = True
        if self.store.find_vm(DEFAULT_VM) is None:
            self.create_vm(DEFAULT_VM, DEFAULT_NETWORK)
            created = True
        self._readd_remembered_port_mappings(DEFAULT_VM)
        return UpResult(net, self.get_vm(DEFAULT_VM), created)

    def down(self) -> bool:
        """Remove ``wsl`` and ``WSL`` (and VMs attached to it); the subnet stays remembered,
        and so do the port mappings of the VMs removed (by VM name; ``up`` re-adds
        ``wsl``'s)."""
        net = self.store.find_network(DEFAULT_NETWORK)
        names = [DEFAULT_VM, *(v.name for v in self.store.vms(net.id))] if net else [DEFAULT_VM]
        vms_gone = [self._delete_vm(name, remember=True) for name in dict.fromkeys(names)]
        net_gone = self.delete_network(DEFAULT_NETWORK, force=True)
        return any(vms_gone) or net_gone

    def restore(self) -> list[str]:
        """Recreate every kernel object of the state (after a reboot); what was made."""
        made: list[str] = []
        networks = self.store.networks()
        for net in networks:
            if self._ensure_bridge(net):
                made.append(f"bridge {net.bridge} of network {net.name}")
        if networks:
            self.kernel.enable_forwarding()
            if any(n.mirrored for n in networks):
                self.kernel.enable_forwarding6()
            self._sync_nat()
        by_id = {n.id: n for n in networks}
        for vm in self.store.vms():
            if netns_exists(vm.netns) and self.kernel.link_exists(vm.host_ifname):
                self.kernel.attach_port(vm.host_ifname, by_id[vm.network_id].bridge)
                self._configure_vm_side(vm, by_id[vm.network_id])
                continue
            self._teardown_vm(vm)
            self._apply_vm(vm, by_id[vm.network_id])
            made.append(f"vm {vm.name} ({vm.ip}, {vm.mac})")
        if networks:
            self._poke_daemon()     # mirrored VMs' tables were made again: their ports too
        return made

    def gc(self, dry_run: bool = False) -> list[str]:
        """Remove kernel objects tagged with this instance that the state does not know."""
        networks = self.store.networks()
        vms = self.store.vms()
        known_links = {n.bridge for n in networks} | {v.host_ifname for v in vms}
        known_netns = {v.netns for v in vms}
        found: list[str] = []
        from hns.kernel import kill_netns_processes
        links = self.kernel.tagged_links(naming.instance_alias_prefix(self.instance))
        # endpoints first: deleting a bridge does not delete its ports
        for link in sorted(links, key=lambda n: not n.startswith("hv")):
            if link not in known_links:
                found.append(f"link {link}")
                if not dry_run:
                    self.kernel.delete_link(link)
        prefix = naming.netns_prefix(self.instance)
        for ns in list_netns():
            if ns.startswith(prefix) and ns not in known_netns:
                found.append(f"netns {ns}")
                if not dry_run:
                    kill_netns_processes(ns)
                    delete_netns(ns)
        with contextlib.suppress(FileNotFoundError):
            for entry in sorted(os.listdir(resolv.ETC_NETNS)):
                if entry.startswith(prefix) and entry not in known_netns:
                    found.append(f"resolv.conf {resolv.ETC_NETNS}/{entry}")
                    if not dry_run:
                        resolv.remove_vm_resolv(entry)
        table = f"inet {naming.nft_table_name(self.instance)}"
        tables = self.nft.list_tables()
        if not networks and table in tables:
            found.append(f"nft table {table}")
            if not dry_run:
                self._sync_nat()
        # the daemon's inbound table of mirrored networks, left by a daemon that was killed
        mirror = f"{naming.nft_table_name(self.instance)}-mirror"
        if f"inet {mirror}" in tables and not any(n.mirrored for n in networks):
            found.append(f"nft table inet {mirror}")
            if not dry_run:
                self.nft.apply(render_delete("inet", mirror))
        return found


@contextlib.contextmanager
def open_service(state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR,
                 host_netns: str | None = None) -> Iterator[Service]:
    service = Service(state_dir, host_netns)
    try:
        yield service
    finally:
        service.close()

