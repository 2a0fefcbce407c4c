"""The kernel driver: links, addresses, routes and sysctls through pyroute2.

Host-side work runs on one :class:`~hns.netns.NetnsExecutor` bound to the host namespace
(pyroute2 sockets are per thread, and a socket lives in the namespace its thread was in
when it was made).  VM-side work runs on a short-lived thread inside the VM namespace.
Every ``NetlinkError`` is translated to :class:`~hns.errors.KernelError` here; callers
never see pyroute2 types.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network, IPv6Interface, ip_interface, ip_network
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hns import netns as _ns
from hns import resolv
from hns.errors import KernelError
from hns.kernel_api import EndpointSpec
from hns.mirrored import HostView, MirrorSpec, host_view
from hns.netns import NetnsExecutor, netns_path, run_in_netns

__all__ = ["EndpointSpec", "HostKernel", "LinuxKernel", "configure_mirrored_vm",
           "configure_vm_side", "kill_netns_processes", "netns_tag", "tag_netns"]

T = TypeVar("T")
BRIDGE_MODE_HAIRPIN = 1  # IFLA_BRPORT_MODE: see HostKernel.attach_port
IFA_F_NODAD = 0x02
IFA_F_NOPREFIXROUTE = 0x200
RT_TABLE_MAIN = 254
RTPROT_KERNEL = 2


@contextmanager
def _netlink(what: str) -> Iterator[None]:
    try:
        yield
    except NetlinkError as exc:
        code = int(exc.code) if exc.code else errno.EIO
        raise KernelError(f"{what}: {os.strerror(code)}", code) from None


def _index(ipr: Any, ifname: str) -> int | None:
    try:
        return int(ipr.link("get", ifname=ifname)[0]["index"])
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise


class HostKernel:
    """Kernel operations in the host namespace (None: this process's)."""

    def __init__(self, host_netns: str | None) -> None:
        self.host_netns = host_netns
        self._executor = NetnsExecutor(host_netns)

    def close(self) -> None:
        def close_ipr() -> None:
            ipr = getattr(self._executor.local, "ipr", None)
            if ipr is not None:
                ipr.close()
                self._executor.local.ipr = None
        self._executor.call(close_ipr)
        self._executor.close()

    def _call(self, fn: Callable[..., T], *args: object) -> T:
        def with_ipr() -> T:
            local = self._executor.local
            if getattr(local, "ipr", None) is None:
                local.ipr = IPRoute()
            return fn(local.ipr, *args)
        return self._executor.call(with_ipr)

    def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` on the host namespace's thread (sockets, /proc/sys)."""
        return self._executor.call(fn, *args)

    # inventory

    def inventory(self, skip_links: frozenset[str] = frozenset()) -> list[tuple[str, IPv4Network]]:
        """IPv4 prefixes in use in the host namespace: its addresses and routes.

        ``skip_links`` are interfaces whose addresses and routes do not count (the
        bridges of hns itself).  The default route does not count either.
        """
        def collect(ipr: Any) -> list[tuple[str, IPv4Network]]:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            found: list[tuple[str, IPv4Network]] = []
            for msg in ipr.get_addr(family=socket.AF_INET):
                dev = names.get(msg["index"], "?")
                addr = msg.get_attr("IFA_ADDRESS")
                if dev in skip_links or dev == "lo" or addr is None:
                    continue
                net = IPv4Network(f"{addr}/{msg['prefixlen']}", strict=False)
                found.append((f"address {addr}/{msg['prefixlen']} on {dev}", net))
                found.append((f"address {addr} on {dev}", IPv4Network(addr)))
            for msg in ipr.get_routes(family=socket.AF_INET):
                dev = names.get(msg.get_attr("RTA_OIF"), "?")
                dst = msg.get_attr("RTA_DST")
                if (msg["dst_len"] == 0 or dst is None or dev in skip_links or dev == "lo"
                        or msg["type"] != 1):  # RTN_UNICAST only
                    continue
                net = IPv4Network(f"{dst}/{msg['dst_len']}", strict=False)
                found.append((f"route {net} dev {dev}", net))
            return found
        with _netlink("cannot read the host's addresses and routes"):
            return self._call(collect)

    # links

    def link_exists(self, ifname: str) -> bool:
        with _netlink(f"cannot look up {ifname}"):
            return self._call(_index, ifname) is not None

    def delete_link(self, ifname: str) -> bool:
        """Delete a link if present; True if it was there."""
        def delete(ipr: Any) -> bool:
            try:
                ipr.link("del", ifname=ifname)
            except NetlinkError as exc:
                if exc.code in (errno.ENODEV, errno.ENOENT):
                    return False
                raise
            return True
        with _netlink(f"cannot delete link {ifname}"):
            return self._call(delete)

    def tagged_links(self, alias_prefix: str) -> dict[str, str]:
        """Links whose alias starts with ``alias_prefix``: name -> alias."""
        def scan(ipr: Any) -> dict[str, str]:
            found = {}
            for link in ipr.get_links():
                alias = link.get_attr("IFLA_IFALIAS")
                if alias and alias.startswith(alias_prefix):
                    found[link.get_attr("IFLA_IFNAME")] = alias
            return found
        with _netlink("cannot list links"):
            return self._call(scan)

    def ensure_bridge(self, name: str, gateway: IPv4Address, prefixlen: int, mtu: int,
                      alias: str, mac: str) -> bool:
        """Create the bridge with its fixed MAC and the gateway address, or fix it up;
        True if created.  A MAC set on a bridge stays, whatever ports come and go."""
        def ensure(ipr: Any) -> bool:
            index = _index(ipr, name)
            created = index is None
            if index is None:
                ipr.link("add", ifname=name, kind="bridge", mtu=mtu, address=mac)
                index = _index(ipr, name)
            link = ipr.link("get", index=index)[0]
            if link.get_attr("IFLA_ADDRESS") != mac:
                ipr.link("set", index=index, address=mac)
            ipr.link("set", index=index, ifalias=alias, mtu=mtu)
            # no duplicate address detection: the bridge's IPv6 (mirrored networks) works
            # at once instead of after a second or two
            with contextlib.suppress(OSError), \
                    open(f"/proc/sys/net/ipv6/conf/{name}/accept_dad", "w") as f:
                f.write("0")
            have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                    for a in ipr.get_addr(index=index, family=socket.AF_INET)}
            if (str(gateway), prefixlen) not in have:
                ipr.addr("add", index=index, address=str(gateway), prefixlen=prefixlen)
            ipr.link("set", index=index, state="up")
            return created
        with _netlink(f"cannot set up bridge {name}"):
            return self._call(ensure)

    def enable_forwarding(self) -> None:
        def write() -> None:
            with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
                f.write("1")
        try:
            self.run(write)
        except OSError as exc:
            raise KernelError(f"cannot enable IPv4 forwarding: {exc.strerror}",
                              exc.errno) from None

    def enable_forwarding6(self) -> None:
        """IPv6 forwarding on; interfaces that take router advertisements (accept_ra=1)
        are set to 2 first, so that they go on taking them with forwarding on."""
        def write() -> None:
            conf = "/proc/sys/net/ipv6/conf"
            for dev in sorted(os.listdir(conf)):
                path = f"{conf}/{dev}/accept_ra"
                with contextlib.suppress(OSError), open(path) as f:
                    if f.read().strip() == "1":
                        with open(path, "w") as w:
                            w.write("2")
            with open(f"{conf}/all/forwarding", "w") as f:
                f.write("1")
        try:
            self.run(write)
        except OSError as exc:
            raise KernelError(f"cannot enable IPv6 forwarding: {exc.strerror}",
                              exc.errno) from None

    def ensure_address6(self, ifname: str, address: IPv6Interface) -> None:
        """Add an IPv6 address (no duplicate address detection) if the link lacks it."""
        def ensure(ipr: Any) -> None:
            index = _index(ipr, ifname)
            if index is None:
                raise KernelError(f"{ifname} does not exist", errno.ENODEV)
            have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index,
                                                                    family=socket.AF_INET6)}
            if str(address.ip) not in have:
                ipr.addr("add", index=index, address=str(address.ip),
                         prefixlen=address.network.prefixlen, flags=IFA_F_NODAD)
        with _netlink(f"cannot add {address} to {ifname}"):
            self._call(ensure)

    def host_view(self, skip_links: frozenset[str] = frozenset()) -> HostView:
        """The host's addresses and main-table routes to mirror into VMs (leaving out
        ``lo`` and ``skip_links``)."""
        def collect(ipr: Any) -> HostView:
            return _read_view(ipr, skip_links)
        with _netlink("cannot read the host's addresses and routes"):
            return self._call(collect)

    def add_endpoint(self, spec: EndpointSpec) -> None:
        """A veth pair: host side on the bridge, the peer as ``eth0`` in the VM namespace."""
        def add(ipr: Any) -> None:
            master = _index(ipr, spec.bridge)
            if master is None:
                raise KernelError(f"bridge {spec.bridge} does not exist (run 'hnsctl restore')",
                                  errno.ENODEV)
            ipr.link("add", ifname=spec.host_ifname, kind="veth", mtu=spec.mtu,
                     peer={"ifname": "eth0", "address": spec.mac, "mtu": spec.mtu,
                           "net_ns_fd": netns_path(spec.netns)})
            index = _index(ipr, spec.host_ifname)
            ipr.link("set", index=index, master=master, ifalias=spec.alias, state="up")
            ipr.brport("set", index=index, mode=BRIDGE_MODE_HAIRPIN)
        with _netlink(f"cannot create the endpoint {spec.host_ifname}"):
            self._call(add)

    def attach_port(self, ifname: str, bridge: str) -> None:
        """Put an existing endpoint back on its bridge (the bridge was recreated), up, in
        hairpin mode.

        Hairpin lets the bridge send a frame back out the port it came from.  A VM
        reaching its own mapped port needs it where br_netfilter is loaded (Docker loads
        it): the DNATed packet is then bridged, not routed, back to the VM's own port."""
        def attach(ipr: Any) -> None:
            index, master = _index(ipr, ifname), _index(ipr, bridge)
            if index is None or master is None:
                raise KernelError(f"{ifname if index is None else bridge} does not exist",
                                  errno.ENODEV)
            ipr.link("set", index=index, master=master, state="up")
            ipr.brport("set", index=index, mode=BRIDGE_MODE_HAIRPIN)
        with _netlink(f"cannot attach {ifname} to {bridge}"):
            self._call(attach)


def configure_vm_side(netns: str, ip: IPv4Address, prefixlen: int,
                      gateway: IPv4Address) -> None:
    """Inside the VM namespace: lo up, eth0 addressed and up, default route via gateway."""
    def configure() -> None:
        with IPRoute() as ipr:
            ipr.link("set", index=1, state="up")
            index = _index(ipr, "eth0")
            if index is None:
                raise KernelError(f"eth0 is missing in {netns}", errno.ENODEV)
            have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)}
            if str(ip) not in have:
                ipr.addr("add", index=index, address=str(ip), prefixlen=prefixlen)
            ipr.link("set", index=index, state="up")
            ipr.route("replace", dst="0.0.0.0/0", gateway=str(gateway), oif=index)
    with _netlink(f"cannot configure the network of {netns}"):
        run_in_netns(netns, configure)


def tag_netns(netns: str, alias: str) -> None:
    """Tag a VM namespace as ours: the alias of its loopback (a namespace has no
    attributes of its own, and ``lo`` is the one link every namespace has)."""
    def tag() -> None:
        with IPRoute() as ipr:
            ipr.link("set", index=1, ifalias=alias)
    with _netlink(f"cannot tag namespace {netns}"):
        run_in_netns(netns, tag)


def netns_tag(netns: str) -> str | None:
    """The tag :func:`tag_netns` gave a namespace (None: none, or not readable)."""
    def read() -> str | None:
        with IPRoute() as ipr:
            alias = ipr.link("get", index=1)[0].get_attr("IFLA_IFALIAS")
            return str(alias) if alias else None
    try:
        return run_in_netns(netns, read)
    except (NetlinkError, OSError, KernelError):
        return None


def kill_netns_processes(netns: str) -> int:
    """SIGKILL every process inside the namespace (the VM is powered off); their count."""
    killed = 0
    for pid in _ns.netns_pids([netns]).get(netns, []):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


def _read_view(ipr: Any, skip_links: frozenset[str]) -> HostView:
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    skip = {i for i, n in names.items() if n in skip_links or n == "lo"}
    addresses = []
    for msg in ipr.get_addr():
        addr = msg.get_attr("IFA_ADDRESS")
        if msg["index"] in skip or addr is None or msg["scope"] != 0:   # global only
            continue
        addresses.append((names.get(msg["index"], "?"),
                          ip_interface(f"{addr}/{msg['prefixlen']}")))
    routes, defaults = [], []
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
            oif = msg.get_attr("RTA_OIF")
            if msg["type"] != 1 or oif in skip or msg.get_attr("RTA_TABLE") != RT_TABLE_MAIN:
                continue
            zero = "0.0.0.0" if family == socket.AF_INET else "::"
            dst = ip_network(f"{msg.get_attr('RTA_DST') or zero}/{msg['dst_len']}",
                             strict=False)
            if dst.prefixlen == 0:
                defaults.append(names.get(oif, "?"))
            routes.append((dst, int(msg.get_attr("RTA_PRIORITY") or 0)))
    return host_view(addresses, routes, defaults)


@contextmanager
def _unless(*codes: int) -> Iterator[None]:
    """Ignore a NetlinkError with one of these error numbers."""
    try:
        yield
    except NetlinkError as exc:
        if exc.code not in codes:
            raise


def configure_mirrored_vm(spec: MirrorSpec) -> None:
    """Inside a mirrored VM: lo and eth0 up, the transit and mirrored addresses on eth0
    (stale ones removed), the host's routes through the transit gateway, rp_filter off
    and accept_local on; the VM's ``hns-mirror`` nft table is applied by the caller."""
    def configure() -> None:
        for path, value in (("ipv4/conf/all/rp_filter", "0"), ("ipv4/conf/eth0/rp_filter", "0"),
                            ("ipv4/conf/all/accept_local", "1"),
                            ("ipv4/conf/eth0/accept_local", "1"),
                            ("ipv6/conf/eth0/accept_ra", "0"),
                            ("ipv6/conf/eth0/accept_dad", "0")):
            with open(f"/proc/sys/net/{path}", "w") as f:
                f.write(value)
        with IPRoute() as ipr:
            ipr.link("set", index=1, state="up")
            index = _index(ipr, "eth0")
            if index is None:
                raise KernelError(f"eth0 is missing in {spec.netns}", errno.ENODEV)
            ipr.link("set", index=index, state="up")
            _set_addresses(ipr, index, spec)
            _set_routes(ipr, index, spec)
    with _netlink(f"cannot configure the network of {spec.netns}"):
        run_in_netns(spec.netns, configure)


def _set_addresses(ipr: Any, index: int, spec: MirrorSpec) -> None:
    transit = {spec.transit4, spec.transit6}
    want = {str(a): a for a in spec.addresses()}
    have = {}
    for msg in ipr.get_addr(index=index):
        addr = msg.get_attr("IFA_ADDRESS")
        if addr is not None and msg["scope"] == 0:
            have[f"{addr}/{msg['prefixlen']}"] = msg
    # The service (vm create, restore) and the daemon (the host changed) may configure a
    # VM at the same time: what the other just did is not an error.
    for key, msg in have.items():
        if key not in want:
            with _unless(errno.EADDRNOTAVAIL, errno.ENOENT):
                ipr.addr("del", index=index, address=key.split("/")[0],
                         prefixlen=msg["prefixlen"])
    for key, iface in want.items():
        if key in have:
            continue
        flags = IFA_F_NODAD if iface.version == 6 else 0
        if iface not in transit:
            flags |= IFA_F_NOPREFIXROUTE
        with _unless(errno.EEXIST):
            ipr.addr("add", index=index, address=str(iface.ip),
                     prefixlen=iface.network.prefixlen, flags=flags)


def _set_routes(ipr: Any, index: int, spec: MirrorSpec) -> None:
    """Replace every non-kernel route of the main table with the mirrored ones."""
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
            if msg["proto"] == RTPROT_KERNEL or msg.get_attr("RTA_TABLE") != RT_TABLE_MAIN:
                continue
            with _unless(errno.ESRCH, errno.ENOENT):
                ipr.route("del", family=family, table=RT_TABLE_MAIN,
                          dst_len=msg["dst_len"], dst=msg.get_attr("RTA_DST"),
                          priority=msg.get_attr("RTA_PRIORITY"), oif=msg.get_attr("RTA_OIF"),
                          gateway=msg.get_attr("RTA_GATEWAY"))
    for dst, gateway, source, metric in spec.routes():
        args: dict[str, Any] = {"dst": str(dst), "gateway": str(gateway), "oif": index,
                                "priority": metric}
        if source is not None:
            args["prefsrc"] = str(source)
        ipr.route("replace", **args)


class LinuxKernel(HostKernel):
    """The :class:`hns.kernel_api.Kernel` of a real machine: the host namespace's
    operations of :class:`HostKernel`, the VM namespaces of :mod:`hns.netns` and this
    module, the VMs' resolv.conf of :mod:`hns.resolv`."""

    def create_netns(self, name: str) -> None:
        _ns.create_netns(name)

    def delete_netns(self, name: str) -> bool:
        return _ns.delete_netns(name)

    def netns_exists(self, name: str) -> bool:
        return _ns.netns_exists(name)

    def list_netns(self) -> list[str]:
        return _ns.list_netns()

    def tag_netns(self, netns: str, alias: str) -> None:
        tag_netns(netns, alias)

    def netns_tag(self, netns: str) -> str | None:
        return netns_tag(netns)

    def kill_netns_processes(self, netns: str) -> int:
        return kill_netns_processes(netns)

    def configure_vm_side(self, netns: str, ip: IPv4Address, prefixlen: int,
                          gateway: IPv4Address) -> None:
        configure_vm_side(netns, ip, prefixlen, gateway)

    def configure_mirrored_vm(self, spec: MirrorSpec, ifname: str) -> None:
        from hns.nft import apply_vm_table
        configure_mirrored_vm(spec)
        apply_vm_table(ifname, spec)

    def vm_side_ok(self, netns: str, ip: IPv4Address, prefixlen: int,
                   gateway: IPv4Address) -> bool:
        from hns.vmcheck import vm_side_ok
        return vm_side_ok(netns, ip, prefixlen, gateway)

    def write_vm_resolv(self, netns: str, gateway: IPv4Address | None, owner: str) -> None:
        resolv.write_vm_resolv(netns, self.host_netns, gateway, owner)

    def vm_resolv_ok(self, netns: str, gateway: IPv4Address | None, owner: str) -> bool:
        return resolv.vm_resolv_ok(netns, self.host_netns, gateway, owner)

    def remove_vm_resolv(self, netns: str) -> None:
        resolv.remove_vm_resolv(netns)

    def vm_resolv_owner(self, netns: str) -> str | None:
        return resolv.vm_resolv_owner(netns)

    def etc_netns_entries(self) -> list[str]:
        try:
            return sorted(os.listdir(resolv.ETC_NETNS))
        except FileNotFoundError:
            return []
