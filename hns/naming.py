"""Deterministic names and tags for the kernel objects of one hns instance.

Netns names are global and several instances (one per state directory) may share a
machine, so every name carries the instance tag: a short random id kept in the state
store.  Interface names must fit in 15 characters: two letters, the 4-character instance
tag and the first 8 hex digits of the object's id (unique per instance by a constraint
of the store).  Links also carry ``IFLA_IFALIAS`` = ``hns:<instance>:<object id>`` so
that the garbage collector finds them without trusting names alone.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "ALIAS_PREFIX",
    "bridge_mac",
    "bridge_name",
    "host_veth_name",
    "instance_alias_prefix",
    "link_alias",
    "netns_prefix",
    "nft_table_name",
    "vm_netns_name",
    "vxlan_name",
]

ALIAS_PREFIX = "hns:"


def short_id(object_id: str) -> str:
    return object_id.replace("-", "")[:8]


def bridge_name(instance: str, network_id: str) -> str:
    return f"hb{instance}{short_id(network_id)}"


def vxlan_name(instance: str, network_id: str) -> str:
    """An overlay network's VXLAN device."""
    return f"hx{instance}{short_id(network_id)}"


def host_veth_name(instance: str, vm_id: str) -> str:
    return f"hv{instance}{short_id(vm_id)}"


def netns_prefix(instance: str) -> str:
    return f"hns-{instance}-"


def vm_netns_name(instance: str, vm_name: str) -> str:
    return f"{netns_prefix(instance)}{vm_name}"


def instance_alias_prefix(instance: str) -> str:
    return f"{ALIAS_PREFIX}{instance}:"


def link_alias(instance: str, object_id: str) -> str:
    return f"{instance_alias_prefix(instance)}{object_id}"


def nft_table_name(instance: str) -> str:
    return f"hns-{instance}"


def bridge_mac(network_id: str) -> str:
    """The bridge's own MAC (the gateway's), fixed from the network ID at creation.

    Linux gives a bridge the lowest MAC of its ports unless one is set: the gateway's MAC
    would change whenever that VM goes, and the others would lose the gateway until
    their neighbour entries time out.  Locally administered (02:) and unicast, so it
    never meets the 00:15:5d addresses of the VMs."""
    digest = hashlib.sha256(network_id.encode()).digest()
    return "02:15:5d:" + ":".join(f"{b:02x}" for b in digest[:3])
