"""The cluster's records in etcd: keys, JSON shapes, and the values derived from them.

Pure: no I/O.  The layout (docs/overlay.md)::

    /hns/v1/networks/NAME          network record         (no lease)
    /hns/v1/vnis/N                 the network's name     (no lease)
    /hns/v1/hosts/HOST             host record            (the host's lease)
    /hns/v1/endpoints/NET/IP       endpoint record        (the host's lease)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from hns.errors import InvalidRequest

__all__ = ["ENDPOINTS", "HOSTS", "MAX_VNI", "MIN_VNI", "NETWORKS", "PREFIX", "VNIS",
           "VXLAN_OVERHEAD", "VXLAN_PORT", "EndpointRecord", "HostRecord", "NetworkRecord",
           "endpoint_key", "host_key", "network_key", "overlay_mac", "parse_host_name",
           "parse_record", "parse_vni", "pick_vni", "vni_key"]

PREFIX = "/hns/v1/"
NETWORKS = PREFIX + "networks/"
VNIS = PREFIX + "vnis/"
HOSTS = PREFIX + "hosts/"
ENDPOINTS = PREFIX + "endpoints/"
VXLAN_PORT = 4789          # IANA's; flannel's default is 8472
VXLAN_OVERHEAD = 50        # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
MIN_VNI = 4096             # the automatic ones start here (below: left to the user)
MAX_VNI = 2**24 - 1


def network_key(name: str) -> str:
    return NETWORKS + name


def vni_key(vni: int) -> str:
    return f"{VNIS}{vni}"


def host_key(name: str) -> str:
    return HOSTS + name


def endpoint_key(network: str, ip: IPv4Address) -> str:
    return f"{ENDPOINTS}{network}/{ip}"


def parse_vni(value: int | str) -> int:
    text = str(value).strip()
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_VNI:
        raise InvalidRequest(f"invalid VNI {value!r}: a number from 1 to {MAX_VNI}")
    return int(text)


def parse_host_name(text: str) -> str:
    """A cluster host name: letters, digits, '-', '_', '.', at most 63 characters."""
    ok = text.isascii() and 0 < len(text) <= 63 and text[0].isalnum() and all(
        ch.isalnum() or ch in "-_." for ch in text)
    if not ok:
        raise InvalidRequest(f"invalid host name {text!r}: use letters, digits, '-', '_', "
                             "'.', at most 63 characters")
    return text


def pick_vni(taken: Iterable[int]) -> int:
    used = set(taken)
    return next(v for v in range(MIN_VNI, MAX_VNI + 1) if v not in used)


def overlay_mac(ip: IPv4Address) -> str:
    """An overlay VM's MAC: the Hyper-V OUI and the address's low 24 bits, so it is
    unique in the segment (a subnet is at most a /8) without being allocated."""
    low = int(ip) & 0xFFFFFF
    return "00:15:5d:" + ":".join(f"{(low >> s) & 0xFF:02x}" for s in (16, 8, 0))


@dataclass(frozen=True)
class NetworkRecord:
    id: str
    name: str
    subnet: IPv4Network
    gateway: IPv4Address
    vni: int
    mtu: int

    def to_json(self) -> dict[str, Any]:
        return {"ID": self.id, "Name": self.name, "Type": "Overlay",
                "Subnet": str(self.subnet), "Gateway": str(self.gateway), "Vni": self.vni,
                "Mtu": self.mtu}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NetworkRecord:
        return cls(str(data["ID"]), str(data["Name"]), IPv4Network(data["Subnet"]),
                   IPv4Address(data["Gateway"]), int(data["Vni"]), int(data["Mtu"]))


@dataclass(frozen=True)
class HostRecord:
    name: str
    address: IPv4Address      # the underlay address, the VTEP
    ttl: int

    def to_json(self) -> dict[str, Any]:
        return {"Name": self.name, "Address": str(self.address), "Vtep": str(self.address),
                "Ttl": self.ttl}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostRecord:
        return cls(str(data["Name"]), IPv4Address(data["Address"]), int(data["Ttl"]))


@dataclass(frozen=True)
class EndpointRecord:
    id: str
    name: str                 # the VM's name on its host
    network: str
    ip: IPv4Address
    mac: str
    host: str
    vtep: IPv4Address

    def to_json(self) -> dict[str, Any]:
        return {"ID": self.id, "Name": self.name, "Network": self.network,
                "IpAddress": str(self.ip), "MacAddress": self.mac, "Host": self.host,
                "Vtep": str(self.vtep)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EndpointRecord:
        return cls(str(data["ID"]), str(data["Name"]), str(data["Network"]),
                   IPv4Address(data["IpAddress"]), str(data["MacAddress"]),
                   str(data["Host"]), IPv4Address(data["Vtep"]))


Record = NetworkRecord | HostRecord | EndpointRecord


def parse_record(key: str, value: str) -> Record | None:
    """The record a key holds; None for a key of another kind or a value that does not
    parse (a record written by a newer hns is skipped, not fatal)."""
    kinds: tuple[tuple[str, type[NetworkRecord] | type[HostRecord] | type[EndpointRecord]],
                 ...] = ((NETWORKS, NetworkRecord), (HOSTS, HostRecord),
                         (ENDPOINTS, EndpointRecord))
    for prefix, kind in kinds:
        if key.startswith(prefix):
            try:
                return kind.from_json(json.loads(value))
            except (ValueError, KeyError, TypeError):
                return None
    return None
