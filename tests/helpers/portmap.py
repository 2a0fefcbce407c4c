"""Helpers of the port-mapping unit tests: a state with one network and two VMs."""

from __future__ import annotations

import uuid
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from hns import naming
from hns.model import Network, NetworkType, Vm
from hns.store import Store


def seed(state: Path) -> None:
    store = Store(state)
    net_id = str(uuid.uuid4())
    net = Network(id=net_id, name="n", type=NetworkType.NAT,
                  subnet=IPv4Network("10.50.0.0/24"), gateway=IPv4Address("10.50.0.1"),
                  mtu=1500, bridge=naming.bridge_name(store.instance, net_id))
    with store.write() as tx:
        tx.insert_network(net)
        for i, name in enumerate(("a", "b"), start=2):
            vm_id = str(uuid.uuid4())
            tx.insert_vm(Vm(
                id=vm_id, name=name, network="n", network_id=net_id,
                netns=naming.vm_netns_name(store.instance, name),
                ip=IPv4Address(f"10.50.0.{i}"), prefixlen=24, gateway=net.gateway,
                mac=f"00:15:5d:00:00:0{i}", host_ifname=naming.host_veth_name(store.instance,
                                                                            vm_id), mtu=1500))
    store.close()
