"""Localhost forwarding in the daemon on fakes: the in-memory kernel and nft, namespaces
played by loopback addresses (:mod:`helpers.fakesockets`); the forwards it starts carry
real bytes between loopback servers."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.fakesockets import FakeSockets, free_port, listener
from helpers.relay import Server, echo, exchange, on_engine, running, wait_for

from hns.daemon.forwarder import Forwarder
from hns.fake_kernel import FakeKernel
from hns.service import Service
from nat.nft import FakeNft
from portproxy.engine import Engine


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Service, FakeSockets, Engine, Forwarder]]:
    sockets = FakeSockets()
    with Service(tmp_path / "state", nft=FakeNft(), kernel=FakeKernel()) as svc:
        svc.create_network("n", "nat", subnet="10.50.0.0/24")
        svc.create_network("off", "nat", subnet="10.51.0.0/24", localhost_forwarding=False)
        with running(Engine(connect_timeout=2.0)) as engine:
            fwd = Forwarder(engine, svc.store, poll_interval=0.01, poll_per_vm=0,
                            full_interval=0.05, retry_interval=0.05, sockets=sockets)
            yield svc, sockets, engine, fwd
            on_engine(engine, fwd.close)


def states(engine: Engine, fwd: Forwarder) -> dict[tuple[str, int], str]:
    status: dict[str, Any] = on_engine(engine, fwd.status)
    return {(row["Vm"], row["Port"]): row["State"] for row in status["Forwards"]}


def test_a_vm_listener_is_at_host_localhost_until_it_closes(
        setup: tuple[Service, FakeSockets, Engine, Forwarder]) -> None:
    svc, sockets, engine, fwd = setup
    vm = svc.create_vm("v", "n")
    port = free_port("127.0.0.1", sockets.address(vm.netns))
    server = Server(echo, socket.create_server((sockets.address(vm.netns), port)))
    try:
        sockets.listening[vm.netns] = [listener(port)]
        on_engine(engine, fwd.reconcile)
        wait_for(lambda: states(engine, fwd).get(("v", port)) == "forwarding", "the forward")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            assert exchange(client, b"localhost" * 500) == b"localhost" * 500
        sockets.listening[vm.netns] = []
        wait_for(lambda: ("v", port) not in states(engine, fwd), "the forward to stop")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
    finally:
        server.close()


def test_a_network_without_localhost_forwarding_is_not_watched(
        setup: tuple[Service, FakeSockets, Engine, Forwarder]) -> None:
    svc, sockets, engine, fwd = setup
    vm = svc.create_vm("w", "off")
    port = free_port("127.0.0.1")
    sockets.listening[vm.netns] = [listener(port)]
    on_engine(engine, fwd.reconcile)
    assert states(engine, fwd) == {}
