"""The kernel seam: what the service asks of the kernel, as a protocol.

:class:`hns.kernel.LinuxKernel` is the real one (pyroute2, namespaces, the VMs'
resolv.conf files); :class:`hns.fake_kernel.FakeKernel` keeps the same objects in memory
for unit tests.  The service receives one (``Service(kernel=...)``) as it receives its
nft runner.  Nothing here imports pyroute2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Interface
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from hns.mirrored import HostView, MirrorSpec

__all__ = ["EndpointSpec", "Kernel"]

T = TypeVar("T")


@dataclass(frozen=True)
class EndpointSpec:
    """A VM's NIC: the host end of its veth pair, its namespace (where the other end is
    ``eth0``), MAC, MTU, the bridge it plugs into and the alias that tags it."""

    host_ifname: str
    netns: str
    mac: str
    mtu: int
    bridge: str
    alias: str


class Kernel(Protocol):
    """Links, addresses, routes and sysctls of the host namespace; the VM namespaces and
    what is inside them; the VMs' resolv.conf.  Failures are ``KernelError``."""

    # the host namespace

    def ensure_bridge(self, name: str, gateway: IPv4Address, prefixlen: int, mtu: int,
                      alias: str, mac: str) -> bool:
        """Make the bridge (or fix it); True if it was made."""
        ...

    def ensure_address6(self, ifname: str, address: IPv6Interface) -> None: ...

    def link_exists(self, ifname: str) -> bool: ...

    def delete_link(self, ifname: str) -> bool:
        """True if there was one."""
        ...

    def tagged_links(self, alias_prefix: str) -> dict[str, str]:
        """Links whose alias starts with ``alias_prefix``: name -> alias."""
        ...

    def inventory(self, skip_links: frozenset[str] = frozenset()
                  ) -> list[tuple[str, IPv4Network]]:
        """The host's IPv4 prefixes (addresses and routes), with what holds each."""
        ...

    def host_view(self, skip_links: frozenset[str] = frozenset()) -> HostView: ...

    def enable_forwarding(self) -> None: ...

    def enable_forwarding6(self) -> None: ...

    def add_endpoint(self, spec: EndpointSpec) -> None: ...

    def attach_port(self, ifname: str, bridge: str) -> None: ...

    def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` inside the host namespace (a netlink call of another module)."""
        ...

    def close(self) -> None: ...

    # VM namespaces

    def create_netns(self, name: str) -> None: ...

    def delete_netns(self, name: str) -> bool: ...

    def netns_exists(self, name: str) -> bool: ...

    def list_netns(self) -> list[str]: ...

    def tag_netns(self, netns: str, alias: str) -> None: ...

    def netns_tag(self, netns: str) -> str | None: ...

    def kill_netns_processes(self, netns: str) -> int: ...

    def configure_vm_side(self, netns: str, ip: IPv4Address, prefixlen: int,
                          gateway: IPv4Address) -> None: ...

    def configure_mirrored_vm(self, spec: MirrorSpec, ifname: str) -> None:
        """The VM's addresses and routes as the host's, and its ``hns-mirror`` table."""
        ...

    def vm_side_ok(self, netns: str, ip: IPv4Address, prefixlen: int,
                   gateway: IPv4Address) -> bool:
        """Whether the VM's eth0 still has what ``configure_vm_side`` gave it."""
        ...

    # the VMs' resolv.conf (/etc/netns/<netns>/resolv.conf)

    def write_vm_resolv(self, netns: str, gateway: IPv4Address | None, owner: str) -> None: ...

    def vm_resolv_ok(self, netns: str, gateway: IPv4Address | None, owner: str) -> bool:
        """Whether the VM's resolv.conf is what ``write_vm_resolv`` would write now."""
        ...

    def remove_vm_resolv(self, netns: str) -> None: ...

    def vm_resolv_owner(self, netns: str) -> str | None: ...

    def etc_netns_entries(self) -> list[str]: ...
