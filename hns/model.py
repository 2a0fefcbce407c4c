"""The object model: networks, VMs (HNS endpoints in their namespaces), port mappings.

Values are frozen dataclasses that validate nothing on their own: user input goes
through the ``parse_*`` functions, which raise :class:`InvalidRequest` with a message fit
for one line on stderr.  ``to_json`` gives the shapes of ``hnsctl --json`` (a superset of
HNS's own field names, so tools written against hcn can read them).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from hns.errors import InvalidRequest

__all__ = [
    "DEFAULT_MTU",
    "HostPort",
    "Network",
    "NetworkOptions",
    "NetworkType",
    "PortMapping",
    "Power",
    "Protocol",
    "Vm",
    "format_port_list",
    "parse_decimal",
    "parse_host_address",
    "parse_idle_timeout",
    "parse_ipv4",
    "parse_mac",
    "parse_mtu",
    "parse_name",
    "parse_netns_name",
    "parse_network_options",
    "parse_on_off",
    "parse_port",
    "parse_port_list",
    "parse_subnet",
    "resolver",
]

DEFAULT_MTU = 1500
MIN_MTU = 576
MAX_MTU = 65535
PRIVATE_RANGES = tuple(IPv4Network(r) for r in
                       ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"))
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
NETNS_RE = re.compile(r"[A-Za-z0-9_.@+-]{1,255}")
MAC_RE = re.compile(r"[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}")
PORT_RE = re.compile(r"[0-9]{1,5}")
DIGITS_RE = re.compile(r"[0-9]+")  # ASCII only: int() and str.isdigit() take any script


class NetworkType(enum.Enum):
    NAT = "NAT"
    MIRRORED = "Mirrored"   # shared IP: the VM appears with the host's addresses
    OVERLAY = "Overlay"     # one subnet across the hosts of a cluster, over VXLAN

    @classmethod
    def parse(cls, text: str) -> NetworkType:
        for member in cls:
            if member.value.lower() == text.lower():
                return member
        choices = ", ".join(m.value.lower() for m in cls)
        raise InvalidRequest(f"unknown network type {text!r} (choose from: {choices})")


def parse_name(text: str, what: str = "name") -> str:
    if not NAME_RE.fullmatch(text):
        raise InvalidRequest(
            f"invalid {what} {text!r}: use letters, digits, '-', '_', '.', at most 32 "
            "characters, starting with a letter or digit")
    return text


def parse_subnet(text: str) -> IPv4Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise InvalidRequest(f"invalid subnet {text!r}: {exc}") from None
    if not isinstance(net, IPv4Network):
        raise InvalidRequest(f"invalid subnet {text!r}: NAT networks are IPv4 only")
    if net.prefixlen > 30:
        raise InvalidRequest(f"invalid subnet {text!r}: too small, at most /30")
    if not any(net.subnet_of(r) for r in PRIVATE_RANGES):
        raise InvalidRequest(f"invalid subnet {text!r}: use a private range "
                             "(10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10)")
    return net


def parse_netns_name(text: str, what: str = "namespace") -> str:
    """A namespace name under /run/netns, as iproute2 accepts it: no path."""
    if not NETNS_RE.fullmatch(text) or text in (".", ".."):
        raise InvalidRequest(f"invalid {what} name {text!r}: not a name under /run/netns")
    return text


def parse_ipv4(text: str, what: str = "address") -> IPv4Address:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise InvalidRequest(f"invalid {what} {text!r}: not an IP address") from None
    if not isinstance(addr, IPv4Address):
        raise InvalidRequest(f"invalid {what} {text!r}: NAT networks are IPv4 only")
    return addr


def parse_mac(text: str) -> str:
    """A unicast MAC in lower case with colons (``-`` accepted as the separator too)."""
    mac = text.strip().lower()
    if not text.isascii() or not MAC_RE.fullmatch(mac):
        raise InvalidRequest(f"invalid MAC address {text!r}: expected six hex bytes")
    mac = mac.replace("-", ":")
    first = int(mac[:2], 16)
    if first & 1:
        raise InvalidRequest(f"invalid MAC address {text!r}: multicast bit set")
    if mac == "00:00:00:00:00:00":
        raise InvalidRequest(f"invalid MAC address {text!r}: all zeros")
    return mac


def parse_on_off(text: str, what: str = "switch") -> bool:
    """``on``/``off`` (also true/false, yes/no, 1/0, any case) as a bool."""
    word = text.strip().lower() if text.isascii() else ""
    if word in ("on", "true", "yes", "1"):
        return True
    if word in ("off", "false", "no", "0"):
        return False
    raise InvalidRequest(f"invalid {what} {text!r}: use on or off")


def parse_decimal(text: str, what: str) -> int:
    """A non-negative number written in ASCII digits (no sign, space or ``_``)."""
    if not DIGITS_RE.fullmatch(text):
        raise InvalidRequest(f"invalid {what} {text!r}: not a number")
    digits = text.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else 10 ** 18  # beyond every range we check


def parse_mtu(value: int | str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidRequest(f"invalid MTU {value!r}: not a number")
    mtu = parse_decimal(value, "MTU") if isinstance(value, str) else value
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise InvalidRequest(f"invalid MTU {value}: must be between {MIN_MTU} and {MAX_MTU}")
    return mtu


@dataclass(frozen=True)
class Network:
    id: str
    name: str
    type: NetworkType
    subnet: IPv4Network
    gateway: IPv4Address
    mtu: int
    bridge: str
    localhost_forwarding: bool = True   # WSL's localhostForwarding (NAT only)
    ignored_ports: tuple[int, ...] = ()  # mirrored: never forwarded (WSL's ignoredPorts)
    host_address_loopback: bool = False  # mirrored: WSL's hostAddressLoopback
    firewall: bool = True               # WSL's firewall: nothing unsolicited reaches a VM
    dns_proxy: bool = True              # WSL's dnsProxy: the VMs' nameserver is the gateway
    vni: int | None = None              # overlay: the VXLAN network identifier

    @property
    def mirrored(self) -> bool:
        return self.type is NetworkType.MIRRORED

    @property
    def overlay(self) -> bool:
        return self.type is NetworkType.OVERLAY

    def to_json(self) -> dict[str, Any]:
        mirrored = {"IgnoredPorts": list(self.ignored_ports),
                    "HostAddressLoopback": self.host_address_loopback} if self.mirrored else {}
        return {
            "ID": self.id,
            "Name": self.name,
            "Type": self.type.value,
            "Subnet": str(self.subnet),
            "Gateway": str(self.gateway),
            "Bridge": self.bridge,
            "Mtu": self.mtu,
            "LocalhostForwarding": self.localhost_forwarding and not self.mirrored,
            "Firewall": self.firewall or self.mirrored,
            "DnsProxy": self.dns_proxy,
            **mirrored,
            **({"Vni": self.vni, "Policies": [{"Type": "VSID",
                                                "Settings": {"IsolationId": self.vni}}]}
               if self.overlay else {}),
            "Ipams": [{
                "Type": "Static",
                "Subnets": [{
                    "IpAddressPrefix": str(self.subnet),
                    "Routes": [{"NextHop": str(self.gateway),
                                "DestinationPrefix": "0.0.0.0/0"}],
                }],
            }],
            "SchemaVersion": {"Major": 2, "Minor": 0},
        }


def parse_idle_timeout(value: int | str | None) -> int | None:
    """An idle timeout in milliseconds: a whole number >= 0, or -1 / None for never."""
    if value is None:
        return None
    text = str(value).strip()
    negative = text.startswith("-")
    digits = text[1:] if negative else text
    if not DIGITS_RE.fullmatch(digits) or (negative and digits != "1") or \
            int(digits) > 2**31 - 1:
        raise InvalidRequest(f"bad idle timeout {text!r}: milliseconds, a whole number "
                             ">= 0, or -1 for never")
    return None if negative else int(digits)


def resolver(vm: Vm, net: Network) -> IPv4Address | None:
    """The nameserver a VM's resolv.conf names first: the DNS proxy on its gateway, or
    None when its network has the proxy off (the host's resolvers then)."""
    return vm.gateway if net.dns_proxy else None


class Power(enum.Enum):
    """Whether a VM is on (its namespace and veth exist) or off (only its row: address,
    MAC, port mappings kept)."""

    RUNNING = "running"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Vm:
    id: str
    name: str
    network: str
    network_id: str
    netns: str
    ip: IPv4Address
    prefixlen: int
    gateway: IPv4Address
    mac: str
    host_ifname: str
    mtu: int
    interface: str = "eth0"
    policies: tuple[dict[str, Any], ...] = field(default=())
    power: Power = Power.RUNNING
    idle_timeout_ms: int | None = None      # reclaimed when idle this long; None: never

    @property
    def running(self) -> bool:
        return self.power is Power.RUNNING

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Name": self.name,
            "NetNs": self.netns,
            "Network": self.network,
            "HostComputeNetwork": self.network_id,
            "IpAddress": str(self.ip),
            "PrefixLength": self.prefixlen,
            "Gateway": str(self.gateway),
            "MacAddress": self.mac,
            "InterfaceName": self.interface,
            "HostInterfaceName": self.host_ifname,
            "Mtu": self.mtu,
            "IpConfigurations": [{"IpAddress": str(self.ip), "PrefixLength": self.prefixlen}],
            "Routes": [{"NextHop": str(self.gateway), "DestinationPrefix": "0.0.0.0/0"}],
            "Policies": list(self.policies),
            "State": self.power.value.capitalize(),
            "IdleTimeout": self.idle_timeout_ms if self.idle_timeout_ms is not None else -1,
        }


# port mappings (HNS's PortMapping endpoint policy)


class Protocol(enum.Enum):
    """IP protocol of a port mapping; the value is HNS's number (6, 17)."""

    TCP = 6
    UDP = 17

    @property
    def keyword(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str | int) -> Protocol:
        word = str(text).strip(" \t").lower()
        for member in cls:
            if word in (member.keyword, str(member.value)):
                return member
        raise InvalidRequest(f"invalid protocol {text!r}: use tcp or udp")


def parse_port(value: int | str, what: str = "port") -> int:
    """A port number 1-65535, from an int or a string of digits."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidRequest(f"invalid {what} {value!r}: not a number")
    if isinstance(value, str) and not PORT_RE.fullmatch(value):
        raise InvalidRequest(f"invalid {what} {value!r}: not a number")
    port = int(value)
    if not 1 <= port <= 65535:
        raise InvalidRequest(f"invalid {what} {value}: must be between 1 and 65535")
    return port


def parse_port_list(text: str | None, what: str = "port list") -> tuple[int, ...]:
    """``22,8000-8010`` as a sorted tuple of distinct ports (empty text: no port); at most
    4096 ports in all."""
    if text is None or not text.strip(" \t"):
        return ()
    ports: set[int] = set()
    for item in text.split(","):
        word = item.strip(" \t")
        low, sep, high = word.partition("-")
        if not word or (sep and not high):
            raise InvalidRequest(f"invalid {what} {text!r}: empty item")
        first = parse_port(low.strip(" \t"), what)
        last = parse_port(high.strip(" \t"), what) if sep else first
        if last < first:
            raise InvalidRequest(f"invalid {what} {text!r}: range {word} runs backwards")
        ports.update(range(first, last + 1))
        if len(ports) > 4096:
            raise InvalidRequest(f"invalid {what} {text!r}: more than 4096 ports")
    return tuple(sorted(ports))


def format_port_list(ports: tuple[int, ...]) -> str:
    """The inverse of :func:`parse_port_list`, with ranges folded: ``22,8000-8010``."""
    items: list[str] = []
    i = 0
    while i < len(ports):
        j = i
        while j + 1 < len(ports) and ports[j + 1] == ports[j] + 1:
            j += 1
        items.append(str(ports[i]) if i == j else f"{ports[i]}-{ports[j]}")
        i = j + 1
    return ",".join(items)


def parse_host_address(text: str | IPv4Address | None) -> IPv4Address | None:
    """The host address of a mapping; None (and 0.0.0.0) mean every host address."""
    if text is None:
        return None
    addr = parse_ipv4(str(text), "host address")
    if addr.is_unspecified:
        return None
    if addr.is_loopback or addr.is_multicast or addr == IPv4Address("255.255.255.255"):
        raise InvalidRequest(f"invalid host address {text!r}: a kernel port mapping needs a "
                             "unicast address that is not loopback")
    return addr


@dataclass(frozen=True)
class HostPort:
    """What a mapping takes on the host: a protocol's port on one address or (None) on
    every address."""

    protocol: Protocol
    port: int
    address: IPv4Address | None = None

    @classmethod
    def parse(cls, protocol: Protocol | str, port: int | str,
              address: IPv4Address | str | None = None) -> HostPort:
        return cls(protocol if isinstance(protocol, Protocol) else Protocol.parse(protocol),
                   parse_port(port, "external port"), parse_host_address(address))

    def overlaps(self, other: HostPort) -> bool:
        """Same protocol and port on an overlapping address (every address overlaps
        each single one)."""
        return (self.protocol is other.protocol and self.port == other.port
                and (self.address is None or other.address is None
                     or self.address == other.address))

    def describe(self) -> str:
        return f"{self.protocol.keyword} {self.address or '*'}:{self.port}"


@dataclass(frozen=True)
class PortMapping:
    """Host ``protocol`` port ``external_port`` (on ``host_address``, or on every host
    address when None) is forwarded to ``internal_port`` of VM ``vm``."""

    vm: str
    protocol: Protocol
    external_port: int
    internal_port: int
    host_address: IPv4Address | None = None

    @classmethod
    def parse(cls, vm: str, protocol: Protocol | str, external_port: int | str,
              internal_port: int | str,
              host_address: IPv4Address | str | None = None) -> PortMapping:
        """Validate user input (InvalidRequest with a one-line message)."""
        name = parse_name(vm, "vm name")
        host = HostPort.parse(protocol, external_port, host_address)
        return cls(vm=name, protocol=host.protocol, external_port=host.port,
                   internal_port=parse_port(internal_port, "internal port"),
                   host_address=host.address)

    @property
    def host_port(self) -> HostPort:
        return HostPort(self.protocol, self.external_port, self.host_address)

    def describe(self) -> str:
        return f"{self.host_port.describe()} -> vm {self.vm} port {self.internal_port}"

    def to_json(self) -> dict[str, Any]:
        return {
            "Vm": self.vm,
            "Protocol": self.protocol.keyword,
            "ExternalPort": self.external_port,
            "InternalPort": self.internal_port,
            "HostAddress": str(self.host_address) if self.host_address else None,
        }

    def to_policy(self) -> dict[str, Any]:
        """HNS's endpoint policy."""
        return {"Type": "PortMapping", "Settings": {
            "Protocol": self.protocol.value,
            "InternalPort": self.internal_port,
            "ExternalPort": self.external_port,
            "VIP": str(self.host_address) if self.host_address else "",
        }}


@dataclass(frozen=True)
class NetworkOptions:
    """The checked options of ``network create`` (all but the name)."""

    type: NetworkType
    subnet: IPv4Network | None
    gateway: IPv4Address | None
    mtu: int
    ignored_ports: tuple[int, ...]


def parse_network_options(type: NetworkType | str, subnet: IPv4Network | str | None,
                          gateway: IPv4Address | str | None, mtu: int | str | None,
                          ignored_ports: str | tuple[int, ...] | None,
                          host_address_loopback: bool | None) -> NetworkOptions:
    """Check the options of a new network together: InvalidRequest for what does not
    fit (a subnet for a mirrored network, mirrored-only options on a NAT one, ...)."""
    from hns import ipam
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
    return NetworkOptions(net_type, pinned, gw, size, ignored)
