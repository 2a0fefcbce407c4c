"""Overlay networks on one host: the service's side of a cluster (docs/overlay.md).

An overlay network is, on each host, a NAT network (bridge with the gateway address,
masquerade, isolation) whose bridge also has a VXLAN device for a port; its record and
its VMs' addresses live in etcd.  Creates write etcd first: when etcd cannot be reached
nothing local is made (exit 1).  :meth:`Overlay.adopt` makes a cluster network exist on
this host; the CLI calls it at a VM's create and the daemon's agent for every network it
sees, both through the network's lock, so it is idempotent.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import socket
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

from hns import ipam, naming
from hns.cluster.config import ClusterConfig
from hns.cluster.records import VXLAN_OVERHEAD, EndpointRecord, NetworkRecord, parse_vni
from hns.errors import AlreadyExists, ClusterError, HnsError, InvalidRequest
from hns.model import MIN_MTU, Network, NetworkOptions, NetworkType, Vm
from hns.store import ANY_STATE
from hns.subnets import pick_subnet

if TYPE_CHECKING:
    from hns.cluster.state import ClusterState
    from hns.service import Service

__all__ = ["VTEP_META", "Overlay"]

log = logging.getLogger("hns")

VTEP_META = "cluster_vtep"        # the VTEP this host last used (restore needs no etcd)
CLUSTER_META = "cluster"          # the cluster this host was last named in


def _endpoint_address(url: str) -> IPv4Address:
    host = url.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    try:
        found = ipaddress.ip_address(host)
    except ValueError:
        try:
            found = ipaddress.ip_address(socket.gethostbyname(host))
        except OSError as exc:
            raise ClusterError(f"etcd endpoint {url}: cannot resolve {host}: {exc}") from None
    if not isinstance(found, IPv4Address):
        raise ClusterError(f"etcd endpoint {url}: the underlay is IPv4 only")
    return found


def _remembered(svc: Service) -> ClusterConfig | None:
    text = svc.store.meta(CLUSTER_META)
    if not text:
        return None
    try:
        data = json.loads(text)
        return ClusterConfig(tuple(data["endpoints"]), str(data["host"]), int(data["ttl"]),
                             IPv4Address(data["address"]) if data.get("address") else None)
    except (ValueError, KeyError, TypeError):
        return None


class Overlay:
    """The overlay part of one :class:`~hns.service.Service`."""

    def __init__(self, svc: Service, config: ClusterConfig | None) -> None:
        """``config`` None: the cluster the state directory remembers, if any (a host
        named in a cluster once need not name it again)."""
        self.svc = svc
        self.named = config is not None
        self.config = config if config is not None else _remembered(svc)
        self._state: ClusterState | None = None

    @property
    def state(self) -> ClusterState:
        if self.config is None:
            raise InvalidRequest("overlay networks need a cluster: name its etcd endpoints "
                                 "with --cluster or HNS_CLUSTER")
        if self._state is None:
            from hns.cluster.etcd import Etcd  # requests: imported when needed
            from hns.cluster.state import ClusterState
            # requests run on the host namespace's thread: their sockets are made there
            etcd = Etcd(self.config.endpoints, runner=lambda fn: self.svc.kernel.run(fn))
            self._state = ClusterState(etcd, self.config.host)
        return self._state

    def close(self) -> None:
        if self._state is not None:
            self._state.etcd.close()

    def remember(self) -> None:
        """Keep the cluster named for the commands that do not name it (called once etcd
        has answered a write: a mistyped cluster is not remembered)."""
        if self.config is None or not self.named:
            return
        text = json.dumps({"endpoints": list(self.config.endpoints), "host": self.config.host,
                           "ttl": self.config.ttl,
                           "address": str(self.config.address or "") or None})
        if self.svc.store.meta(CLUSTER_META) != text:
            self.svc.store.set_meta(CLUSTER_META, text)

    # the underlay

    def underlay(self) -> tuple[IPv4Address, int]:
        """This host's VTEP address and the MTU of the interface that holds it."""
        from hns.cluster.vxlan import underlay_for
        if self.config is None:
            raise InvalidRequest("overlay networks need a cluster (--cluster or HNS_CLUSTER)")
        target = self.config.address or _endpoint_address(self.config.endpoints[0])
        found = self.svc.kernel.run(underlay_for, target)
        if found is None:
            raise ClusterError(f"no route from this host to etcd at {target}: cannot tell "
                               "its underlay address (name it with --cluster-address)")
        if self.svc.store.meta(VTEP_META) != str(found[0]):
            self.svc.store.set_meta(VTEP_META, str(found[0]))
        return found

    def vtep(self) -> IPv4Address | None:
        remembered = self.svc.store.meta(VTEP_META)
        return IPv4Address(remembered) if remembered else None

    # networks

    def create_network(self, name: str, opts: NetworkOptions, mtu_given: bool,
                       vni: int | str | None) -> Network:
        """A network of the whole cluster, and made on this host."""
        if opts.subnet is None:
            raise InvalidRequest("an overlay network needs --subnet: the one subnet of "
                                 "every host's VMs")
        wanted_vni = parse_vni(vni) if vni is not None else None
        state = self.state
        svc = self.svc
        _, underlay_mtu = self.underlay()
        mtu = opts.mtu if mtu_given else max(MIN_MTU, underlay_mtu - VXLAN_OVERHEAD)
        with svc.store.lock(f"network-{name}"):
            if svc.store.find_network(name, ANY_STATE) is not None:
                raise AlreadyExists(f"network {name!r} already exists")
            others = [(f"network {n.name}", n.subnet) for n in svc.store.networks(ANY_STATE)]
            pick_subnet(name, False, opts.subnet, others, svc._host_prefixes(), None)
            gateway = opts.gateway or ipam.default_gateway(opts.subnet)
            record = state.create_network(name, opts.subnet, gateway, wanted_vni, mtu)
            self.remember()                  # etcd answered: this is the host's cluster
            try:
                return self._adopt_locked(record)
            except BaseException:
                with contextlib.suppress(HnsError):
                    state.delete_network(name)
                raise

    def adopt(self, record: NetworkRecord) -> Network:
        """The cluster's network ``record`` made on this host (if it is not yet)."""
        with self.svc.store.lock(f"network-{record.name}"):
            return self._adopt_locked(record)

    def _adopt_locked(self, record: NetworkRecord) -> Network:
        svc = self.svc
        found = svc.store.find_network(record.name)
        if found is not None:
            if found.id != record.id:
                raise AlreadyExists(f"network {record.name!r} of this host is not the "
                                    "cluster's network of that name")
            return found
        net = Network(id=record.id, name=record.name, type=NetworkType.OVERLAY,
                      subnet=record.subnet, gateway=record.gateway, mtu=record.mtu,
                      bridge=naming.bridge_name(svc.instance, record.id), vni=record.vni)
        svc.add_network(net)
        return net

    def apply_network(self, net: Network) -> None:
        """The network's VXLAN device (its bridge exists)."""
        from hns.cluster.vxlan import ensure_vxlan
        vtep = self.vtep() if self.config is None else self.underlay()[0]
        if vtep is None or net.vni is None:
            raise ClusterError(f"network {net.name}: this host has no VTEP address yet "
                               "(name the cluster)")
        self.svc.kernel.run(ensure_vxlan, naming.vxlan_name(self.svc.instance, net.id), net.vni,
                            vtep, net.mtu, net.bridge, self.svc.alias(net.id))

    def delete_network(self, net: Network) -> None:
        """The cluster's record goes first (refused while any host has VMs on it)."""
        self.state.delete_network(net.name)

    def local_network(self, name: str) -> Network | None:
        """``name`` as this host has it, adopted from the cluster if only etcd has it."""
        found = self.svc.store.find_network(name)
        if found is not None or self.config is None:
            return found
        record = self.state.network(name)
        return self.adopt(record) if record is not None else None

    # endpoints

    def allocate(self, net: Network, vm_name: str, vm_id: str,
                 want: IPv4Address | None) -> EndpointRecord:
        found = self.state.allocate(net.name, vm_name, vm_id, want)
        self.remember()
        return found

    def release(self, vm: Vm, strict: bool) -> None:
        """Delete the VM's endpoint record; ``strict``: a failure to reach etcd is the
        caller's (a delete fails and changes nothing), else it is left to the agent's
        resync."""
        try:
            self.state.release(vm.network, vm.ip, vm.id)
        except ClusterError:
            if strict:
                raise
            log.warning("vm %s: its endpoint record stays until the daemon's resync",
                        vm.name)
