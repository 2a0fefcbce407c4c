"""VM stop/start and drift healing on the in-memory kernel and nft: what the service
removes, keeps, makes again and repairs, asserted on the resulting kernel objects."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hns.errors import InvalidRequest, NotFound
from hns.fake_kernel import FakeKernel
from hns.model import Power, parse_idle_timeout
from hns.service import Service
from nat.nft import FakeNft
from nat.transaction import Transaction


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()


@pytest.fixture
def nft() -> FakeNft:
    return FakeNft()


@pytest.fixture
def svc(tmp_path: Path, kernel: FakeKernel, nft: FakeNft) -> Iterator[Service]:
    with Service(tmp_path / "state", nft=nft, kernel=kernel) as service:
        service.create_network("n", "nat", subnet="10.50.0.0/24")
        yield service


def mapped(nft: FakeNft, svc: Service) -> set[tuple[str, ...]]:
    table = nft.table("inet", svc.nat.name)
    assert table is not None
    return {e.key for m in table.maps for e in m.elements}


def test_a_stopped_vm_keeps_its_row_and_loses_its_kernel_objects(
        svc: Service, kernel: FakeKernel, nft: FakeNft) -> None:
    vm = svc.create_vm("v", "n")
    svc.add_port_mapping("v", "tcp", 8080, 80)
    assert mapped(nft, svc)
    assert svc.stop_vm("v") is True
    assert vm.netns not in kernel.namespaces and vm.host_ifname not in kernel.links
    assert vm.netns not in kernel.resolv
    stopped = svc.get_vm("v")
    assert stopped.power is Power.STOPPED and svc.vm_state(stopped) == "Stopped"
    assert (stopped.ip, stopped.mac) == (vm.ip, vm.mac)
    assert [m.external_port for m in svc.list_port_mappings("v")] == [8080]
    assert mapped(nft, svc) == set()         # the host answers: refused, not black-holed
    assert svc.stop_vm("v") is False


def test_start_brings_back_the_same_address_mac_and_mappings(
        svc: Service, kernel: FakeKernel, nft: FakeNft) -> None:
    vm = svc.create_vm("v", "n")
    svc.add_port_mapping("v", "tcp", 8080, 80)
    before = mapped(nft, svc)
    svc.stop_vm("v")
    assert svc.start_vm("v") is True
    again = svc.get_vm("v")
    assert again.running and (again.ip, again.mac) == (vm.ip, vm.mac)
    assert kernel.namespaces[vm.netns].eth0_mac == vm.mac
    assert kernel.links[vm.host_ifname].master == svc.get_network("n").bridge
    assert mapped(nft, svc) == before
    assert svc.start_vm("v") is False


def test_a_mapping_added_to_a_stopped_vm_waits_for_its_start(
        svc: Service, nft: FakeNft) -> None:
    svc.create_vm("v", "n")
    svc.stop_vm("v")
    svc.add_port_mapping("v", "udp", 5353, 53)
    assert mapped(nft, svc) == set()
    svc.start_vm("v")
    assert len(mapped(nft, svc)) == 1


def test_a_missing_namespace_shows_as_missing(svc: Service, kernel: FakeKernel) -> None:
    vm = svc.create_vm("v", "n")
    kernel.lose_namespace(vm.netns)
    assert svc.vm_state(svc.get_vm("v")) == "Missing"


def test_stop_of_an_unknown_vm_is_not_found(svc: Service) -> None:
    with pytest.raises(NotFound):
        svc.stop_vm("nope")


def test_restore_leaves_a_stopped_vm_stopped(svc: Service, kernel: FakeKernel) -> None:
    vm = svc.create_vm("v", "n")
    svc.stop_vm("v")
    svc.restore()
    assert vm.netns not in kernel.namespaces


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), (-1, None), ("-1", None), (0, 0), ("60000", 60000)])
def test_idle_timeouts(value: int | str | None, expected: int | None) -> None:
    assert parse_idle_timeout(value) == expected


@pytest.mark.parametrize("value", ["-2", "1.5", "", "abc", str(2**31), "--1"])
def test_bad_idle_timeouts(value: str) -> None:
    with pytest.raises(InvalidRequest, match="idle timeout"):
        parse_idle_timeout(value)


def test_create_vm_keeps_its_idle_timeout(svc: Service) -> None:
    assert svc.create_vm("v", "n", idle_timeout_ms=1500).idle_timeout_ms == 1500
    assert svc.get_vm("v").idle_timeout_ms == 1500
    assert svc.set_idle_timeout("v", -1).idle_timeout_ms is None


# healing


def test_nothing_drifted_nothing_repaired(svc: Service) -> None:
    svc.create_vm("v", "n")
    assert svc.heal() == []


def test_a_deleted_bridge_comes_back_with_its_ports(svc: Service, kernel: FakeKernel) -> None:
    vm = svc.create_vm("v", "n")
    bridge = svc.get_network("n").bridge
    kernel.delete_link(bridge)
    (repair,) = svc.heal()
    assert repair.kind == "bridge" and "was gone" in repair.why
    assert kernel.links[bridge].addresses == {"10.50.0.1/24"}
    assert kernel.links[vm.host_ifname].master == bridge


def test_a_lost_bridge_address_is_put_back(svc: Service, kernel: FakeKernel) -> None:
    bridge = svc.get_network("n").bridge
    kernel.links[bridge].addresses.clear()
    (repair,) = svc.heal()
    assert "lost its address 10.50.0.1/24" in repair.why
    assert kernel.links[bridge].addresses == {"10.50.0.1/24"}


def test_a_flushed_or_deleted_nft_table_is_rendered_again(svc: Service, nft: FakeNft) -> None:
    svc.create_vm("v", "n")
    svc.add_port_mapping("v", "tcp", 8080, 80)
    whole = nft.table("inet", svc.nat.name)
    nft.run(Transaction().destroy_table("inet", svc.nat.name))
    (repair,) = svc.heal()
    assert repair.kind == "nft" and "was gone" in repair.why
    assert nft.table("inet", svc.nat.name) == whole
    assert whole is not None
    flushed = Transaction()
    for chain in whole.chains:
        flushed.flush_chain("inet", svc.nat.name, chain.name)
    nft.run(flushed)
    (repair,) = svc.heal()
    assert "lost rules" in repair.why and nft.table("inet", svc.nat.name) == whole


def test_a_lost_namespace_comes_back_with_the_same_address_and_mac(
        svc: Service, kernel: FakeKernel) -> None:
    vm = svc.create_vm("v", "n")
    kernel.lose_namespace(vm.netns)
    (repair,) = svc.heal()
    assert (repair.kind, repair.what) == ("vm", "vm v")
    assert kernel.namespaces[vm.netns].eth0_mac == vm.mac
    assert kernel.namespaces[vm.netns].config == ("nat", vm.ip, 24, vm.gateway)


def test_a_deleted_veth_is_made_again(svc: Service, kernel: FakeKernel) -> None:
    vm = svc.create_vm("v", "n")
    kernel.delete_link(vm.host_ifname)
    (repair,) = svc.heal()
    assert repair.kind == "veth"
    assert kernel.links[vm.host_ifname].peer_netns == vm.netns
    assert kernel.namespaces[vm.netns].eth0_mac == vm.mac


def test_an_overwritten_resolv_conf_is_written_again(svc: Service, kernel: FakeKernel) -> None:
    vm = svc.create_vm("v", "n")
    kernel.resolv[vm.netns] = (vm.gateway, "someone else")
    (repair,) = svc.heal()
    assert repair.kind == "resolv"
    assert kernel.resolv[vm.netns] == (vm.gateway, svc.instance_id)


def test_a_lost_vm_address_is_checked_when_asked(svc: Service, kernel: FakeKernel) -> None:
    vm = svc.create_vm("v", "n")
    kernel.namespaces[vm.netns].config = None
    assert svc.heal(inside=False) == []      # a round that does not look inside
    (repair,) = svc.heal()
    assert repair.kind == "address"
    assert kernel.namespaces[vm.netns].config == ("nat", vm.ip, 24, vm.gateway)


def test_what_hns_deleted_or_stopped_is_not_brought_back(
        svc: Service, kernel: FakeKernel) -> None:
    gone = svc.create_vm("gone", "n")
    off = svc.create_vm("off", "n")
    svc.delete_vm("gone")
    svc.stop_vm("off")
    assert svc.heal() == []
    assert gone.netns not in kernel.namespaces and off.netns not in kernel.namespaces


def test_a_quick_round_reads_only_what_has_no_event(svc: Service, kernel: FakeKernel,
                                                    nft: FakeNft) -> None:
    vm = svc.create_vm("v", "n")
    kernel.delete_link(svc.get_network("n").bridge)
    nft.run(Transaction().destroy_table("inet", svc.nat.name))
    kernel.resolv.pop(vm.netns)
    assert [r.kind for r in svc.heal(full=False)] == ["resolv"]
    assert sorted(r.kind for r in svc.heal()) == ["bridge", "nft"]
