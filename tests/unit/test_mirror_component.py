"""The daemon's mirrored component on fakes: the in-memory kernel, an nft fake per
namespace and namespaces played by loopback addresses (:mod:`helpers.fakesockets`).
What it serves, renders and configures is asserted on what the fakes then hold; the
relays it starts carry real bytes between loopback servers."""

from __future__ import annotations

import socket
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address, ip_interface
from pathlib import Path
from typing import Any

import pytest
from helpers.fakesockets import FakeSockets, free_port, listener
from helpers.relay import Server, echo, exchange, on_engine, running, wait_for

from hns.daemon.mirror import Mirror
from hns.fake_kernel import FakeKernel
from hns.mirrored import HostView, MirrorSpec
from hns.model import Vm
from hns.service import Service
from nat.nft import FakeNft
from portproxy.engine import Engine

HOST = ip_interface("192.0.2.10/24")
MOVED = ip_interface("198.51.100.7/24")


def dial(address: str, port: int) -> socket.socket:
    return socket.create_connection((address, port), timeout=10)


def view_of(iface: Any) -> HostView:
    return HostView(addresses=(iface,), primary4=iface.ip)


@dataclass
class World:
    svc: Service
    kernel: FakeKernel
    nfts: defaultdict[str | None, FakeNft]
    sockets: FakeSockets
    engine: Engine
    mirror: Mirror
    vm: Vm

    @property
    def vm_addr(self) -> str:
        return self.sockets.address(self.vm.netns)

    def reconcile(self) -> None:
        on_engine(self.engine, self.mirror.reconcile)

    def rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = on_engine(self.engine, self.mirror.status)["Mirrored"]
        return rows

    def state(self, port: int, direction: str = "to vm") -> str | None:
        for row in self.rows():
            if row["Port"] == port and row["Direction"] == direction:
                return str(row["State"])
        return None

    def inbound(self) -> dict[tuple[str, ...], tuple[str, ...]]:
        """The host table's IPv4 inbound map: (protocol, port) -> (target, port)."""
        table = self.nfts[None].table("inet", self.mirror.table)
        assert table is not None, "the host's mirror table is missing"
        (in4,) = [m for m in table.maps if m.name == "in4"]
        return {e.key: e.value for e in in4.elements}

    def host_addresses(self) -> set[str]:
        table = self.nfts[None].table("inet", self.mirror.table)
        assert table is not None
        (addrs,) = [s for s in table.sets if s.name == "addrs4"]
        return {e.key[0] for e in addrs.elements}

    def spec(self) -> MirrorSpec:
        config = self.kernel.namespaces[self.vm.netns].config
        assert config is not None and config[0] == "mirrored"
        spec = config[1]
        assert isinstance(spec, MirrorSpec)
        return spec


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    kernel = FakeKernel(view=view_of(HOST))
    nfts: defaultdict[str | None, FakeNft] = defaultdict(FakeNft)
    sockets = FakeSockets()
    with Service(tmp_path / "state", nft=FakeNft(), kernel=kernel) as svc:
        svc.create_network("m", "mirrored")
        vm = svc.create_vm("v", "m")
        with running(Engine(connect_timeout=2.0)) as engine:
            mirror = Mirror(engine, svc.store, None, poll_interval=0.01, poll_per_vm=0,
                            full_interval=0.05, view_interval=0.05, retry_interval=0.05,
                            kernel=kernel, nft=lambda netns: nfts[netns], sockets=sockets)
            yield World(svc, kernel, nfts, sockets, engine, mirror, vm)
            on_engine(engine, mirror.close)


def test_a_vm_listener_is_served_on_host_loopback_and_inbound(world: World) -> None:
    port = free_port("127.0.0.1", world.vm_addr)
    server = Server(echo, socket.create_server((world.vm_addr, port)))
    try:
        world.sockets.listening[world.vm.netns] = [listener(port)]
        world.reconcile()
        wait_for(lambda: world.state(port) == "forwarding", "the forward")
        with dial("127.0.0.1", port) as client:
            assert exchange(client, b"mirrored" * 1000) == b"mirrored" * 1000
        transit = str(world.spec().transit4.ip)
        assert world.inbound() == {("tcp", str(port)): (transit, str(port))}
        assert world.host_addresses() == {str(HOST.ip)}
        assert world.spec().view == view_of(HOST)
    finally:
        server.close()


def test_a_port_the_host_holds_is_a_conflict_and_not_served(world: World) -> None:
    port = free_port("127.0.0.1", world.vm_addr)
    world.sockets.listening[None] = [listener(port)]
    world.sockets.listening[world.vm.netns] = [listener(port)]
    world.reconcile()
    wait_for(lambda: (world.state(port) or "").startswith("conflict"), "the conflict")
    assert world.inbound() == {}


def test_a_host_loopback_service_is_reached_from_the_vm_loopback(world: World) -> None:
    port = free_port("127.0.0.1", world.vm_addr)
    server = Server(echo, socket.create_server(("127.0.0.1", port)))
    try:
        world.sockets.listening[None] = [listener(port, address="127.0.0.1")]
        world.reconcile()
        wait_for(lambda: world.state(port, "to host") == "forwarding", "the reverse relay")
        with dial(world.vm_addr, port) as client:
            assert exchange(client, b"to the host") == b"to the host"
        assert world.inbound() == {}          # loopback only: nothing inbound
    finally:
        server.close()


def test_a_new_host_address_is_mirrored_and_rendered(world: World) -> None:
    port = free_port("127.0.0.1", world.vm_addr)
    world.sockets.listening[world.vm.netns] = [listener(port)]
    world.reconcile()
    wait_for(lambda: world.state(port) == "forwarding", "the forward")
    world.kernel.view = view_of(MOVED)
    wait_for(lambda: world.host_addresses() == {str(MOVED.ip)}, "the new address")
    assert world.spec().view.primary4 == IPv4Address(str(MOVED.ip))
    assert ("tcp", str(port)) in world.inbound()      # the port survived the re-render


def test_a_replaced_namespace_drops_the_vm_claims_until_it_is_back(world: World) -> None:
    port = free_port("127.0.0.1", world.vm_addr)
    world.sockets.listening[world.vm.netns] = [listener(port)]
    world.reconcile()
    wait_for(lambda: world.state(port) == "forwarding", "the forward")
    world.sockets.gone.add(world.vm.netns)
    world.sockets.replace(world.vm.netns)
    wait_for(lambda: world.state(port) is None, "the VM's claims to go")
    wait_for(lambda: world.inbound() == {}, "the inbound element to go")
    with pytest.raises(ConnectionRefusedError):
        dial("127.0.0.1", port).close()
    world.sockets.gone.discard(world.vm.netns)
    wait_for(lambda: world.state(port) == "forwarding", "the forward again")


def test_the_host_table_goes_with_the_last_mirrored_vm(world: World) -> None:
    port = free_port("127.0.0.1", world.vm_addr)
    world.sockets.listening[world.vm.netns] = [listener(port)]
    world.reconcile()
    wait_for(lambda: world.state(port) == "forwarding", "the forward")
    world.svc.delete_vm("v")
    world.reconcile()
    assert world.nfts[None].table("inet", world.mirror.table) is None
    assert world.rows() == []
    with pytest.raises(ConnectionRefusedError):
        dial("127.0.0.1", port).close()


def test_ignored_ports_are_not_claimed(world: World, tmp_path: Path) -> None:
    port = free_port("127.0.0.1", world.vm_addr)
    other = free_port("127.0.0.1", world.vm_addr)
    world.svc.delete_vm("v")
    world.svc.delete_network("m")
    world.svc.create_network("m", "mirrored", ignored_ports=(port,))
    world.vm = world.svc.create_vm("v", "m")
    world.sockets.listening[world.vm.netns] = [listener(port), listener(other)]
    world.reconcile()
    wait_for(lambda: world.state(other) == "forwarding", "the forward")
    assert world.state(port) is None
    assert set(world.inbound()) == {("tcp", str(other))}
    assert ip_address(world.inbound()[("tcp", str(other))][0]) == world.spec().transit4.ip
