"""The keeper's pure parts: netlink message types, and idle reclaim on a fake clock,
fake process counts and fake relay connections (the service is the in-memory one)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from hns.daemon import keeper as keeper_mod
from hns.daemon.keeper import Keeper, message_types
from hns.fake_kernel import FakeKernel
from hns.service import Service
from nat.nft import FakeNft


def message(kind: int, payload: bytes = b"") -> bytes:
    length = 16 + len(payload)
    return struct.pack("=LHHLL", length, kind, 0, 0, 0) + payload + \
        b"\0" * (((length + 3) & ~3) - length)


def test_message_types_of_a_datagram() -> None:
    data = message(16, b"abc") + message(17) + message(21, b"x" * 8)
    assert message_types(data) == [16, 17, 21]
    assert message_types(b"") == [] and message_types(b"\x01" * 7) == []
    assert message_types(struct.pack("=LHHLL", 3, 17, 0, 0, 0)) == []   # a bad length


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    with Service(tmp_path / "state", nft=FakeNft(), kernel=FakeKernel()) as service:
        service.create_network("n", "nat", subnet="10.50.0.0/24")
        yield service


def test_an_idle_vm_is_stopped_after_its_timeout_and_a_busy_one_is_not(
        svc: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    processes = {"busy": 1}
    connections = {"relayed": 2}
    monkeypatch.setattr(keeper_mod, "processes_in", lambda names: {
        n: processes.get(n.rsplit("-", 1)[1], 0) for n in names})
    for name in ("idle", "busy", "relayed"):
        svc.create_vm(name, "n", idle_timeout_ms=1000)
    svc.create_vm("kept", "n")
    keeper = Keeper(str(svc.store.state_dir), None, lambda: dict(connections), heal=False,
                    clock=clock)
    keeper._reclaim(svc)                  # first seen: the clock starts
    clock.now += 0.9
    keeper._reclaim(svc)
    assert all(v.running for v in svc.list_vms())
    clock.now += 0.2
    keeper._reclaim(svc)
    states = {v.name: v.running for v in svc.list_vms()}
    assert states == {"idle": False, "busy": True, "relayed": True, "kept": True}
    assert [r["Vm"] for r in keeper.status()["Reclaimed"]] == ["idle"]
    processes.clear()                     # the busy VM's process ends: its clock starts
    keeper._reclaim(svc)
    clock.now += 1.0
    keeper._reclaim(svc)
    assert not svc.get_vm("busy").running and svc.get_vm("relayed").running


ROUTE_TEXT = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    "eth0\t00000000\t0100090A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    "eth0\t0000090A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
    "eth1\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n")


def test_default_gateways_from_proc_net_route() -> None:
    from ipaddress import IPv4Address

    from hns.vmcheck import default_gateways
    assert default_gateways(ROUTE_TEXT, "eth0") == {IPv4Address("10.9.0.1")}
    assert default_gateways(ROUTE_TEXT, "eth1") == {IPv4Address("192.168.1.1")}
    assert default_gateways(ROUTE_TEXT.splitlines()[0], "eth0") == set()
