"""Mirrored (shared-IP) mode, the pure half: transit addresses and the host view.

A mirrored network is a transit network underneath (see docs/mirrored.md): a /24 in
``169.254.0.0/16`` and an IPv6 ULA /64 derived from it, a bridge with the gateways, one
veth per VM.  On top of its transit addresses the VM's ``eth0`` carries the host's own
addresses, and its routing table the host's routes through the transit gateway.  This
module computes all of that from values; :mod:`hns.kernel` reads the host
(:meth:`~hns.kernel.HostKernel.host_view`) and applies it to a VM
(:func:`~hns.kernel.configure_mirrored_vm`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)

from hns.model import Vm

__all__ = [
    "TRANSIT_POOL",
    "TRANSIT_PREFIXLEN",
    "HostRoute",
    "HostView",
    "MirrorSpec",
    "host_view",
    "mirror_spec",
    "transit6_address",
    "transit6_gateway",
    "transit6_subnet",
    "transit_addresses",
]

TRANSIT_POOL = IPv4Network("169.254.0.0/16")
TRANSIT_PREFIXLEN = 24
_ULA_PREFIX = 0xFD686E73      # fd68:6e73 ("hns")
_LINK_LOCAL6 = IPv6Network("fe80::/10")
_MULTICAST6 = IPv6Network("ff00::/8")

Interface = IPv4Interface | IPv6Interface
Prefix = IPv4Network | IPv6Network


def transit6_subnet(instance: str, subnet: IPv4Network) -> IPv6Network:
    """``fd68:6e73:<instance>:<k>::/64``, k the third octet of the IPv4 transit /24."""
    k = subnet.network_address.packed[2]
    value = (_ULA_PREFIX << 96) | (int(instance, 16) << 80) | (k << 64)
    return IPv6Network((value, 64))


def transit6_gateway(instance: str, subnet: IPv4Network) -> IPv6Address:
    return transit6_subnet(instance, subnet).network_address + 1


def transit6_address(instance: str, subnet: IPv4Network, ip: IPv4Address) -> IPv6Address:
    """The VM's IPv6 transit address: its IPv4 host part in the transit /64."""
    host = int(ip) - int(subnet.network_address)
    return transit6_subnet(instance, subnet).network_address + host


@dataclass(frozen=True, order=True)
class HostRoute:
    """A route of the host's main table, as mirrored: destination and metric."""

    dst: Prefix
    metric: int = 0

    @property
    def version(self) -> int:
        return self.dst.version


@dataclass(frozen=True)
class HostView:
    """The host's global addresses and routes, and the primary address per family (on
    the interface of the default route, else the first)."""

    addresses: tuple[Interface, ...] = ()
    routes: tuple[HostRoute, ...] = ()
    primary4: IPv4Address | None = None
    primary6: IPv6Address | None = None

    def primary(self, version: int) -> IPv4Address | IPv6Address | None:
        return self.primary4 if version == 4 else self.primary6

    def addresses_of(self, version: int) -> tuple[Interface, ...]:
        return tuple(a for a in self.addresses if a.version == version)


def _mirrorable(iface: Interface, transit: Iterable[Prefix]) -> bool:
    ip = iface.ip
    if ip.is_loopback or ip.is_multicast or ip.is_unspecified:
        return False
    if isinstance(ip, IPv6Address) and ip in _LINK_LOCAL6:
        return False
    return not any(ip in net for net in transit if net.version == ip.version)


def _primary(addresses: list[tuple[str, Interface]], default_devs: list[str],
             version: int) -> IPv4Address | IPv6Address | None:
    """The first address of the family on a default route's device, else the first."""
    mine = [(dev, a.ip) for dev, a in addresses if a.version == version]
    preferred = [ip for dev, ip in mine if dev in default_devs]
    found = preferred or [ip for _dev, ip in mine]
    return found[0] if found else None


def _mirrorable_route(dst: Prefix, transit: tuple[Prefix, ...]) -> bool:
    if isinstance(dst, IPv6Network) and (dst.subnet_of(_LINK_LOCAL6)
                                         or dst.subnet_of(_MULTICAST6)):
        return False
    return dst.prefixlen == 0 or not any(
        t.version == dst.version and dst.overlaps(t)  # type: ignore[arg-type]
        for t in transit)


def host_view(addresses: Iterable[tuple[str, Interface]],
              routes: Iterable[tuple[Prefix, int]],
              default_devs: Iterable[str] = (),
              transit: Iterable[Prefix] = (TRANSIT_POOL,)) -> HostView:
    """The view of the host to mirror, from its ``(device, address)`` pairs, its
    ``(destination, metric)`` routes and the devices of its default routes.

    Loopback, link-local IPv6, multicast and transit addresses are left out, and so are
    link-local, multicast and transit routes; the caller leaves out the host's ``lo``
    and hns's own links.
    """
    transit = tuple(transit)
    addrs = [(dev, a) for dev, a in addresses if _mirrorable(a, transit)]
    ordered = sorted(dict.fromkeys(a for _dev, a in addrs),
                     key=lambda a: (a.version, int(a.ip)))
    kept = sorted({HostRoute(dst, metric) for dst, metric in routes
                   if _mirrorable_route(dst, transit)},
                  key=lambda r: (r.version, r.dst, r.metric))
    defaults = list(default_devs)
    p4, p6 = _primary(addrs, defaults, 4), _primary(addrs, defaults, 6)
    return HostView(tuple(ordered), tuple(kept),
                    p4 if isinstance(p4, IPv4Address) else None,
                    p6 if isinstance(p6, IPv6Address) else None)


@dataclass(frozen=True)
class MirrorSpec:
    """Everything a mirrored VM's namespace is configured with."""

    netns: str
    transit4: IPv4Interface
    gateway4: IPv4Address
    transit6: IPv6Interface
    gateway6: IPv6Address
    view: HostView

    def addresses(self) -> tuple[Interface, ...]:
        """Every address of the VM's eth0: transit first, then the mirrored ones."""
        return (self.transit4, self.transit6, *self.view.addresses)

    def routes(self) -> list[tuple[Prefix, IPv4Address | IPv6Address,
                                   IPv4Address | IPv6Address | None, int]]:
        """(destination, gateway, preferred source, metric) of every mirrored route."""
        out: list[tuple[Prefix, IPv4Address | IPv6Address,
                        IPv4Address | IPv6Address | None, int]] = []
        for route in self.view.routes:
            gateway = self.gateway4 if route.version == 4 else self.gateway6
            out.append((route.dst, gateway, self.view.primary(route.version), route.metric))
        return out


def transit_addresses(vm: Vm, instance: str) -> tuple[IPv4Address, IPv6Address]:
    """The VM's transit addresses, IPv4 and IPv6 (where the host's DNAT sends)."""
    subnet = IPv4Network(f"{vm.gateway}/{vm.prefixlen}", strict=False)
    return vm.ip, transit6_address(instance, subnet, vm.ip)


def mirror_spec(vm: Vm, instance: str, view: HostView) -> MirrorSpec:
    subnet = IPv4Network(f"{vm.gateway}/{vm.prefixlen}", strict=False)
    transit4, transit6 = transit_addresses(vm, instance)
    return MirrorSpec(netns=vm.netns,
                      transit4=IPv4Interface(f"{transit4}/{vm.prefixlen}"),
                      gateway4=vm.gateway,
                      transit6=IPv6Interface(f"{transit6}/64"),
                      gateway6=transit6_gateway(instance, subnet),
                      view=view)


