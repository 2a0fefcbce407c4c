"""An in-memory :class:`hns.kernel_api.Kernel` for unit tests of the service.

It keeps what the real kernel would hold -- links of the host namespace (bridges with
their address and MAC, the host ends of veth pairs with their bridge), VM namespaces with
their ``lo`` tag and ``eth0``, the VMs' resolv.conf -- and refuses as the kernel does
(``KernelError`` with its errno: a name taken, a bridge or namespace missing).  A veth
pair goes as a whole: deleting either end, or the namespace of its VM end, removes both.
Tests assert on the resulting objects (``links``, ``namespaces``, ``resolv``) and may
break things behind the service's back (``lose_namespace``, ``reboot``).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Interface
from typing import TypeVar

from hns.errors import KernelError
from hns.kernel_api import EndpointSpec
from hns.mirrored import HostView, MirrorSpec

__all__ = ["FakeKernel", "FakeLink", "FakeNamespace"]

T = TypeVar("T")


@dataclass
class FakeLink:
    kind: str                           # "bridge" or "veth"
    alias: str = ""
    mac: str = ""
    mtu: int = 1500
    master: str | None = None           # a veth's bridge
    peer_netns: str | None = None       # a veth's other end, as eth0 there
    addresses: set[str] = field(default_factory=set)


@dataclass
class FakeNamespace:
    tag: str | None = None
    eth0_mac: str | None = None
    config: tuple[object, ...] | None = None    # what configure_* set last


class FakeKernel:
    """See the module.  ``host_prefixes`` and ``view`` are what the host shows."""

    def __init__(self, host_prefixes: list[tuple[str, IPv4Network]] | None = None,
                 view: HostView | None = None) -> None:
        self.links: dict[str, FakeLink] = {}
        self.namespaces: dict[str, FakeNamespace] = {}
        self.resolv: dict[str, tuple[IPv4Address | None, str]] = {}
        self.forwarding: set[int] = set()
        self.host_prefixes = list(host_prefixes or [])
        self.view = view or HostView()
        self.closed = False

    # breaking things behind the service's back

    def lose_namespace(self, name: str) -> None:
        """The namespace vanishes (its veth pair with it), as after ``ip netns del``."""
        self.delete_netns(name)

    def reboot(self) -> None:
        """Every kernel object gone; files (resolv.conf) stay."""
        self.links.clear()
        self.namespaces.clear()
        self.forwarding.clear()

    # the host namespace

    def ensure_bridge(self, name: str, gateway: IPv4Address, prefixlen: int, mtu: int,
                      alias: str, mac: str) -> bool:
        link = self.links.get(name)
        if link is not None and link.kind != "bridge":
            raise KernelError(f"cannot set up bridge {name}: File exists", errno.EEXIST)
        made = link is None
        if link is None:
            link = self.links[name] = FakeLink("bridge")
        link.alias, link.mac, link.mtu = alias, mac, mtu
        link.addresses.add(f"{gateway}/{prefixlen}")
        return made

    def ensure_address6(self, ifname: str, address: IPv6Interface) -> None:
        self._link(ifname).addresses.add(str(address))

    def link_exists(self, ifname: str) -> bool:
        return ifname in self.links

    def delete_link(self, ifname: str) -> bool:
        link = self.links.pop(ifname, None)
        if link is None:
            return False
        if link.kind == "bridge":
            for other in self.links.values():
                if other.master == ifname:
                    other.master = None
        elif link.peer_netns in self.namespaces:
            self.namespaces[link.peer_netns].eth0_mac = None
        return True

    def tagged_links(self, alias_prefix: str) -> dict[str, str]:
        return {name: link.alias for name, link in self.links.items()
                if link.alias.startswith(alias_prefix)}

    def inventory(self, skip_links: frozenset[str] = frozenset()
                  ) -> list[tuple[str, IPv4Network]]:
        found = list(self.host_prefixes)
        for name, link in self.links.items():
            if name not in skip_links:
                found += [(f"address {a} on {name}", IPv4Network(a, strict=False))
                          for a in link.addresses if ":" not in a]   # as LinuxKernel's
        return found

    def host_view(self, skip_links: frozenset[str] = frozenset()) -> HostView:
        return self.view

    def enable_forwarding(self) -> None:
        self.forwarding.add(4)

    def enable_forwarding6(self) -> None:
        self.forwarding.add(6)

    def add_endpoint(self, spec: EndpointSpec) -> None:
        if spec.bridge not in self.links:
            raise KernelError(f"bridge {spec.bridge} does not exist", errno.ENODEV)
        ns = self._netns(spec.netns)
        if spec.host_ifname in self.links or ns.eth0_mac is not None:
            raise KernelError(f"cannot create the endpoint {spec.host_ifname}: File exists",
                              errno.EEXIST)
        self.links[spec.host_ifname] = FakeLink("veth", spec.alias, "", spec.mtu, spec.bridge,
                                                spec.netns)
        ns.eth0_mac = spec.mac

    def attach_port(self, ifname: str, bridge: str) -> None:
        self._link(bridge)
        self._link(ifname).master = bridge

    def run(self, fn: Callable[..., T], *args: object) -> T:
        raise KernelError("the fake kernel runs no netlink code", errno.EOPNOTSUPP)

    def close(self) -> None:
        self.closed = True

    # VM namespaces

    def create_netns(self, name: str) -> None:
        if name in self.namespaces:
            raise KernelError(f"network namespace {name} already exists", errno.EEXIST)
        self.namespaces[name] = FakeNamespace()

    def delete_netns(self, name: str) -> bool:
        if self.namespaces.pop(name, None) is None:
            return False
        for ifname in [n for n, link in self.links.items() if link.peer_netns == name]:
            del self.links[ifname]
        return True

    def netns_exists(self, name: str) -> bool:
        return name in self.namespaces

    def list_netns(self) -> list[str]:
        return sorted(self.namespaces)

    def tag_netns(self, netns: str, alias: str) -> None:
        self._netns(netns).tag = alias

    def netns_tag(self, netns: str) -> str | None:
        ns = self.namespaces.get(netns)
        return ns.tag if ns is not None else None

    def kill_netns_processes(self, netns: str) -> int:
        return 0

    def configure_vm_side(self, netns: str, ip: IPv4Address, prefixlen: int,
                          gateway: IPv4Address) -> None:
        ns = self._netns(netns)
        if ns.eth0_mac is None:
            raise KernelError(f"eth0 is missing in {netns}", errno.ENODEV)
        ns.config = ("nat", ip, prefixlen, gateway)

    def vm_side_ok(self, netns: str, ip: IPv4Address, prefixlen: int,
                   gateway: IPv4Address) -> bool:
        ns = self.namespaces.get(netns)
        return ns is not None and ns.config == ("nat", ip, prefixlen, gateway)

    def configure_mirrored_vm(self, spec: MirrorSpec, ifname: str) -> None:
        ns = self._netns(spec.netns)
        if ns.eth0_mac is None:
            raise KernelError(f"eth0 is missing in {spec.netns}", errno.ENODEV)
        ns.config = ("mirrored", spec)

    # the VMs' resolv.conf

    def write_vm_resolv(self, netns: str, gateway: IPv4Address | None, owner: str) -> None:
        self.resolv[netns] = (gateway, owner)

    def remove_vm_resolv(self, netns: str) -> None:
        self.resolv.pop(netns, None)

    def vm_resolv_ok(self, netns: str, gateway: IPv4Address | None, owner: str) -> bool:
        return self.resolv.get(netns) == (gateway, owner)

    def vm_resolv_owner(self, netns: str) -> str | None:
        entry = self.resolv.get(netns)
        return entry[1] if entry is not None else None

    def etc_netns_entries(self) -> list[str]:
        return sorted(self.resolv)

    def _link(self, name: str) -> FakeLink:
        try:
            return self.links[name]
        except KeyError:
            raise KernelError(f"no link {name}", errno.ENODEV) from None

    def _netns(self, name: str) -> FakeNamespace:
        try:
            return self.namespaces[name]
        except KeyError:
            raise KernelError(f"network namespace {name} does not exist",
                              errno.ENOENT) from None
