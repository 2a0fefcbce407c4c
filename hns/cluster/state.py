"""The cluster's desired state in etcd: networks, address allocation, endpoints.

Every change is one etcd transaction that compares before it writes, so two hosts
racing for a network name, a VNI or an address cannot both win: the loser reads again
(addresses, automatic VNIs) or is told (a name or a VNI the user gave).
"""

from __future__ import annotations

import json
import logging
import uuid
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from hns import ipam
from hns.cluster.etcd import ClusterError, Etcd, KeyValue
from hns.cluster.records import (
    ENDPOINTS,
    NETWORKS,
    EndpointRecord,
    HostRecord,
    NetworkRecord,
    endpoint_key,
    host_key,
    network_key,
    overlay_mac,
    pick_vni,
    vni_key,
)
from hns.errors import AlreadyExists, Conflict, NotFound

__all__ = ["MAX_TRIES", "ClusterState"]

log = logging.getLogger("hns")

MAX_TRIES = 64         # lost compare-and-swap races before giving up


def _network_of(kv: KeyValue | None) -> NetworkRecord | None:
    if kv is None:
        return None
    return NetworkRecord.from_json(json.loads(kv.value))


class ClusterState:
    """One host's view of writing the cluster's records (the CLI's side)."""

    def __init__(self, etcd: Etcd, host: str) -> None:
        self.etcd = etcd
        self.host = host

    # networks

    def networks(self) -> list[NetworkRecord]:
        kvs, _ = self.etcd.get_prefix(NETWORKS)
        return [r for kv in kvs if (r := _network_of(kv)) is not None]

    def network(self, name: str) -> NetworkRecord | None:
        return _network_of(self.etcd.get(network_key(name)))

    def create_network(self, name: str, subnet: IPv4Network, gateway: IPv4Address,
                       vni: int | None, mtu: int) -> NetworkRecord:
        for _ in range(MAX_TRIES):
            existing = self.networks()
            if any(n.name == name for n in existing):
                raise AlreadyExists(f"network {name!r} already exists in the cluster")
            for other in existing:
                if other.subnet.overlaps(subnet):
                    raise Conflict(f"subnet {subnet} overlaps {other.subnet} of overlay "
                                   f"network {other.name}")
            chosen = vni if vni is not None else pick_vni(n.vni for n in existing)
            record = NetworkRecord(str(uuid.uuid4()), name, subnet, gateway, chosen, mtu)
            ok, _ = self.etcd.txn(
                [self.etcd.absent(network_key(name)), self.etcd.absent(vni_key(chosen))],
                [self.etcd.put_op(network_key(name), json.dumps(record.to_json())),
                 self.etcd.put_op(vni_key(chosen), name)])
            if ok:
                return record
            holder = self.etcd.get(vni_key(chosen))
            if vni is not None and holder is not None and holder.value != name:
                raise Conflict(f"VNI {vni} is taken by overlay network {holder.value}")
        raise ClusterError(f"etcd: network {name!r} not created: lost {MAX_TRIES} races")

    def check_deletable(self, name: str) -> None:
        """Conflict while another host has VMs on network ``name``."""
        others = {e.host for e in self.endpoints(name) if e.host != self.host}
        if others:
            raise Conflict(f"overlay network {name!r} has VMs on hosts "
                           f"{', '.join(sorted(others))}: delete them first")

    def delete_network(self, name: str) -> bool:
        kv = self.etcd.get(network_key(name))
        record = _network_of(kv)
        if kv is None or record is None:
            return False
        users = self.endpoints(name)
        if users:
            hosts = ", ".join(sorted({e.host for e in users}))
            raise Conflict(f"overlay network {name!r} has VMs on hosts {hosts}: delete them "
                           "first")
        self.etcd.txn([self.etcd.unchanged(network_key(name), kv.mod_revision)],
                      [self.etcd.delete_op(network_key(name)),
                       self.etcd.delete_op(vni_key(record.vni))])
        return True

    # hosts

    def host_record(self, name: str) -> tuple[HostRecord, int] | None:
        """A host's record and its lease (None: the host is not in the cluster)."""
        kv = self.etcd.get(host_key(name))
        if kv is None:
            return None
        return HostRecord.from_json(json.loads(kv.value)), kv.lease

    def my_lease(self) -> tuple[HostRecord, int]:
        found = self.host_record(self.host)
        if found is None or not found[1]:
            raise ClusterError(f"host {self.host!r} holds no lease in the cluster: its "
                               "daemon keeps it (start 'hnsctl daemon' with the cluster "
                               "named)")
        return found

    # endpoints

    def endpoints(self, network: str | None = None) -> list[EndpointRecord]:
        prefix = ENDPOINTS if network is None else f"{ENDPOINTS}{network}/"
        kvs, _ = self.etcd.get_prefix(prefix)
        return [EndpointRecord.from_json(json.loads(kv.value)) for kv in kvs]

    def allocate(self, network: str, vm_name: str, vm_id: str,
                 want: IPv4Address | None) -> EndpointRecord:
        """An address of ``network`` for a VM of this host, recorded under its lease."""
        me, lease = self.my_lease()
        for _ in range(MAX_TRIES):
            kv = self.etcd.get(network_key(network))
            net = _network_of(kv)
            if kv is None or net is None:
                raise NotFound(f"overlay network {network!r} does not exist in the cluster")
            taken = [e.ip for e in self.endpoints(network)]
            ip = ipam.allocate_ip(net.subnet, net.gateway, taken, want)
            record = EndpointRecord(vm_id, vm_name, network, ip, overlay_mac(ip), self.host,
                                    me.address)
            key = endpoint_key(network, ip)
            ok, _ = self.etcd.txn(
                [self.etcd.absent(key), self.etcd.unchanged(network_key(network),
                                                            kv.mod_revision),
                 self.etcd.present(host_key(self.host))],
                [self.etcd.put_op(key, json.dumps(record.to_json()), lease)])
            if ok:
                return record
            if self.host_record(self.host) is None:
                raise ClusterError(f"host {self.host!r}: its lease expired (is its daemon "
                                   "running?)")
        raise ClusterError(f"etcd: no address allocated in {network!r}: lost {MAX_TRIES} "
                           "races")

    def release(self, network: str, ip: IPv4Address, vm_id: str) -> bool:
        """Delete the VM's endpoint record (only if it is still that VM's)."""
        key = endpoint_key(network, ip)
        kv = self.etcd.get(key)
        if kv is None:
            return False
        record = EndpointRecord.from_json(json.loads(kv.value))
        if record.id != vm_id:
            return False
        ok, _ = self.etcd.txn([self.etcd.unchanged(key, kv.mod_revision)],
                              [self.etcd.delete_op(key)])
        return ok

    # status

    def status(self) -> dict[str, Any]:
        """Hosts (with lease left and VM count) and each endpoint's health."""
        health = self.etcd.health()
        hosts = []
        endpoints = self.endpoints() if any(v is None for v in health.values()) else []
        kvs, revision = (self.etcd.get_prefix(host_key(""))
                         if any(v is None for v in health.values()) else ([], 0))
        for kv in kvs:
            record = HostRecord.from_json(json.loads(kv.value))
            left = self.etcd.time_to_live(kv.lease) if kv.lease else -1
            hosts.append({**record.to_json(), "LeaseLeft": left,
                          "Vms": sum(1 for e in endpoints if e.host == record.name)})
        return {"Host": self.host, "Revision": revision, "Hosts": hosts,
                "Endpoints": [{"Url": url, "Healthy": why is None, "Error": why}
                              for url, why in health.items()]}
