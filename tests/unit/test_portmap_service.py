"""hns.Service, port mappings, against the state in tmp_path and a fake nft (an in-memory
ruleset): the store rows, the nft transactions (incremental, or the full table as a
fallback where nft refuses an element) and the resulting table, refusals and rollback.
No root, no kernel."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from helpers.portmap import seed

from hns import naming
from hns.errors import Conflict, InvalidRequest, KernelError, NotFound
from hns.model import PortMapping, Protocol, Vm
from hns.service import Service
from nat.fake import FakeNft
from nat.ruleset import Element
from nat.transaction import Kind, Transaction, Verb

HOST = IPv4Address("198.51.100.2")


class RefusingNft(FakeNft):
    """Refuses every transaction whose text contains ``refuse`` (nft failing for good)."""

    def __init__(self, refuse: str) -> None:
        super().__init__(error=KernelError)
        self.refuse = refuse

    def run(self, tx: Transaction) -> None:
        if self.refuse in tx.render():
            raise KernelError("nft -f - failed: Error: Could not process rule: Invalid", 22)
        super().run(tx)


def open_svc(state: Path, nft: FakeNft, *, table: bool = True) -> Service:
    """The service on the seeded state; ``table``: with its NAT table made (as ``network
    create`` made it), the fake's record of transactions starting after it."""
    service = Service(state, nft=nft)
    # the conntrack flush is netlink in the host namespace: not for unit tests
    service.port_maps.flush_udp = lambda ports: 0
    if table:
        service.nat.sync()
        nft.transactions.clear()
    return service


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    seed(tmp_path / "state")
    with open_svc(tmp_path / "state", FakeNft(error=KernelError)) as service:
        yield service


def fake(svc: Service) -> FakeNft:
    assert isinstance(svc.nft, FakeNft)
    return svc.nft


def table(svc: Service) -> str:
    return naming.nft_table_name(svc.instance)


def elements(svc: Service, map_name: str) -> tuple[Element, ...]:
    """The elements of one of the NAT table's maps, as the fake ruleset has them now."""
    now = fake(svc).table("inet", table(svc))
    assert now is not None
    return next(m.elements for m in now.maps if m.name == map_name)


def any_(external: int, target: str, internal: int) -> Element:
    return Element(("tcp", str(external)), (target, str(internal)))


def is_whole_render(tx: Transaction) -> bool:
    return [(op.verb, op.kind) for op in tx.ops] == [
        (Verb.ADD, Kind.TABLE), (Verb.DELETE, Kind.TABLE), (Verb.ADD, Kind.TABLE)]


def test_add_is_one_incremental_transaction(svc: Service) -> None:
    m = svc.add_port_mapping("a", "tcp", "8080", "80")
    assert m == PortMapping("a", Protocol.TCP, 8080, 80)
    [tx] = fake(svc).transactions
    assert tx.render() == (
        f"add element inet {table(svc)} pm_any {{ tcp . 8080 : 10.50.0.2 . 80 }}\n"
        f"add element inet {table(svc)} pm_count {{ 10.50.0.2 . tcp . 80 }}\n")
    assert elements(svc, "pm_any") == (any_(8080, "10.50.0.2", 80),)
    assert elements(svc, "pm_addr") == ()
    assert svc.list_port_mappings() == [m]
    assert svc.list_port_mappings("a") == [m] and svc.list_port_mappings("b") == []


def test_bulk_validates_mappings_built_by_hand(svc: Service) -> None:
    for bad in (PortMapping("a", Protocol.TCP, 0, 80), PortMapping("a b", Protocol.TCP, 1, 1),
                PortMapping("a", Protocol.TCP, 1, 70000)):
        with pytest.raises(InvalidRequest):
            svc.add_port_mappings([bad])
    assert svc.list_port_mappings() == [] and fake(svc).transactions == []


def test_policies_show_on_the_vm(svc: Service) -> None:
    svc.add_port_mapping("a", "tcp", 8080, 80)
    svc.add_port_mapping("a", "udp", 5353, 53, "198.51.100.2")
    assert [p["Settings"] for p in svc.get_vm("a").to_json()["Policies"]] == [
        {"Protocol": 6, "InternalPort": 80, "ExternalPort": 8080, "VIP": ""},
        {"Protocol": 17, "InternalPort": 53, "ExternalPort": 5353, "VIP": "198.51.100.2"}]
    assert [len(v.policies) for v in svc.list_vms()] == [2, 0]


@pytest.mark.parametrize(("first", "second"), [
    ((8080, None), (8080, None)),
    ((8080, None), (8080, "198.51.100.2")),
    ((8080, "198.51.100.2"), (8080, None)),
    ((8080, "198.51.100.2"), (8080, "198.51.100.2")),
])
def test_a_host_port_is_taken_once(svc: Service, first: tuple[int, str | None],
                                   second: tuple[int, str | None]) -> None:
    svc.add_port_mapping("a", "tcp", first[0], 80, first[1])
    before = fake(svc).dump()
    with pytest.raises(Conflict, match="already mapped"):
        svc.add_port_mapping("b", "tcp", second[0], 81, second[1])
    assert len(fake(svc).transactions) == 1 and fake(svc).dump() == before
    assert len(svc.list_port_mappings()) == 1


def test_other_protocol_or_address_is_free(svc: Service) -> None:
    svc.add_port_mapping("a", "tcp", 8080, 80, "198.51.100.2")
    svc.add_port_mapping("b", "tcp", 8080, 80, "198.51.100.3")
    svc.add_port_mapping("b", "udp", 8080, 80)
    assert len(svc.list_port_mappings()) == 3


def test_unknown_vm_is_refused(svc: Service) -> None:
    with pytest.raises(NotFound, match="vm 'nope' does not exist"):
        svc.add_port_mapping("nope", "tcp", 80, 80)
    with pytest.raises(NotFound):
        svc.list_port_mappings("nope")
    assert fake(svc).transactions == []


def test_bulk_is_all_or_nothing(svc: Service) -> None:
    batch = [PortMapping("a", Protocol.TCP, p, 80) for p in range(10000, 10100)]
    assert svc.add_port_mappings(batch) == batch
    assert len(fake(svc).transactions) == 1
    with pytest.raises(Conflict, match="mapped twice in one request"):
        svc.add_port_mappings([PortMapping("b", Protocol.UDP, 1, 1),
                               PortMapping("b", Protocol.UDP, 1, 2, HOST)])
    with pytest.raises(Conflict, match="already mapped"):
        svc.add_port_mappings([PortMapping("b", Protocol.UDP, 1, 1),
                               PortMapping("b", Protocol.TCP, 10050, 2)])
    with pytest.raises(NotFound):
        svc.add_port_mappings([PortMapping("b", Protocol.UDP, 1, 1),
                               PortMapping("zz", Protocol.UDP, 2, 1)])
    assert len(svc.list_port_mappings()) == 100 and len(fake(svc).transactions) == 1
    assert len(elements(svc, "pm_any")) == 100


def test_missing_table_falls_back_to_the_full_table(tmp_path: Path) -> None:
    """No table to add an element to (nft: ENOENT): the whole table is rendered."""
    seed(tmp_path / "s")
    with open_svc(tmp_path / "s", FakeNft(error=KernelError), table=False) as svc:
        svc.add_port_mapping("a", "tcp", 8080, 80)
        [tx] = fake(svc).transactions           # the refused one applied nothing
        assert is_whole_render(tx)
        assert elements(svc, "pm_any") == (any_(8080, "10.50.0.2", 80),)
        assert fake(svc).list_tables() == [f"inet {table(svc)}"]


def test_drifted_element_falls_back_to_the_full_table(svc: Service) -> None:
    """The key is in the map with another value (nft: EEXIST): rendered from the state."""
    fake(svc).run(Transaction().add_elements("inet", table(svc), "pm_any",
                                             [any_(8080, "10.50.0.9", 1)]))
    svc.add_port_mapping("a", "tcp", 8080, 80)
    assert is_whole_render(fake(svc).transactions[-1])
    assert elements(svc, "pm_any") == (any_(8080, "10.50.0.2", 80),)


def test_nft_failure_removes_the_row(tmp_path: Path) -> None:
    seed(tmp_path / "s")
    with open_svc(tmp_path / "s", RefusingNft("tcp . 8080")) as svc:
        svc.add_port_mapping("a", "tcp", 9090, 90)
        with pytest.raises(KernelError):
            svc.add_port_mapping("a", "tcp", 8080, 80)
        assert [m.external_port for m in svc.list_port_mappings()] == [9090]
        assert elements(svc, "pm_any") == (any_(9090, "10.50.0.2", 90),)


def test_delete(svc: Service) -> None:
    svc.add_port_mapping("a", "tcp", 8080, 80, "198.51.100.2")
    assert not svc.delete_port_mapping("a", "tcp", 8080)  # not on every address
    assert not svc.delete_port_mapping("a", "udp", 8080, "198.51.100.2")
    assert not svc.delete_port_mapping("nope", "udp", 1)
    with pytest.raises(Conflict, match="mapped to vm 'a', not 'b'"):
        svc.delete_port_mapping("b", "tcp", 8080, "198.51.100.2")
    assert elements(svc, "pm_addr") == (
        Element(("198.51.100.2", "tcp", "8080"), ("10.50.0.2", "80")),)
    assert svc.delete_port_mapping("a", "tcp", "8080", "198.51.100.2")
    assert fake(svc).transactions[-1].render() == (
        f"delete element inet {table(svc)} pm_addr {{ 198.51.100.2 . tcp . 8080 }}\n")
    assert elements(svc, "pm_addr") == ()
    assert svc.list_port_mappings() == []


def test_delete_of_a_missing_element_renders_the_table_without_it(svc: Service) -> None:
    svc.add_port_mapping("a", "tcp", 8080, 80)
    svc.add_port_mapping("a", "tcp", 9090, 90)
    # the element went behind hns's back (nft: ENOENT on its delete)
    fake(svc).run(Transaction().delete_elements("inet", table(svc), "pm_any",
                                                [any_(8080, "10.50.0.2", 80)]))
    assert svc.delete_port_mapping("a", "tcp", 8080)
    assert is_whole_render(fake(svc).transactions[-1])
    assert elements(svc, "pm_any") == (any_(9090, "10.50.0.2", 90),)
    assert [m.external_port for m in svc.list_port_mappings()] == [9090]


def test_delete_vm_takes_its_mappings(svc: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(svc, "teardown_vm", lambda vm: None)
    svc.add_port_mapping("a", "tcp", 8080, 80)
    svc.add_port_mapping("b", "tcp", 9090, 90)
    assert svc.delete_vm("a")
    assert fake(svc).transactions[-1].render() == (
        f"delete element inet {table(svc)} pm_any {{ tcp . 8080 }}\n")
    assert elements(svc, "pm_any") == (any_(9090, "10.50.0.3", 90),)
    assert [m.vm for m in svc.list_port_mappings()] == ["b"]
    assert svc.store.remembered_port_mappings("a") == []


def test_down_remembers_and_vm_delete_forgets(svc: Service,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(svc, "teardown_vm", lambda vm: None)
    svc.add_port_mapping("a", "tcp", 8080, 80)
    assert svc._delete_vm("a", remember=True)
    assert svc.store.remembered_port_mappings("a") == [PortMapping("a", Protocol.TCP, 8080, 80)]
    seed_vm_a_again(svc)
    assert svc.delete_vm("a")
    assert svc.store.remembered_port_mappings("a") == []


def test_remembered_mappings_come_back_except_taken_ports(
        svc: Service, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(svc, "teardown_vm", lambda vm: None)
    kept = [PortMapping("a", Protocol.TCP, 8080, 80), PortMapping("a", Protocol.UDP, 53, 53)]
    svc.add_port_mappings([*kept, PortMapping("a", Protocol.TCP, 7070, 70)])
    assert svc._delete_vm("a", remember=True)
    assert len(svc.store.remembered_port_mappings("a")) == 3
    svc.add_port_mapping("b", "tcp", 7070, 71)  # taken meanwhile
    seed_vm_a_again(svc)
    svc.port_maps.flush_udp = lambda ports: 0
    svc.port_maps.readd_remembered("a")
    assert sorted(svc.list_port_mappings("a"), key=str) == sorted(kept, key=str)
    assert "tcp *:7070 -> vm a port 70 not restored" in caplog.text
    assert svc.store.remembered_port_mappings("a") == []


def seed_vm_a_again(svc: Service) -> None:
    net = svc.get_network("n")
    vm_id = str(uuid.uuid4())
    with svc.store.write() as tx:
        tx.insert_vm(Vm(
            id=vm_id, name="a", network="n", network_id=net.id,
            netns=naming.vm_netns_name(svc.instance, "a"), ip=IPv4Address("10.50.0.9"),
            prefixlen=24, gateway=net.gateway, mac="00:15:5d:00:00:09",
            host_ifname=naming.host_veth_name(svc.instance, vm_id), mtu=1500))


def test_the_store_itself_refuses_a_taken_host_port(svc: Service) -> None:
    svc.add_port_mapping("a", "tcp", 8080, 80)
    vm_b = svc.store.vm("b")
    with pytest.raises(Conflict), svc.store.write() as tx:
        tx.insert_port_mappings({"b": vm_b.id},
                                       [PortMapping("b", Protocol.TCP, 8080, 80, HOST)])
    assert len(svc.list_port_mappings()) == 1


def test_full_render_includes_every_mapping(svc: Service) -> None:
    svc.add_port_mapping("a", "tcp", 8080, 80)
    svc.add_port_mapping("b", "tcp", 443, 8443, "198.51.100.2")
    incremental = fake(svc).dump()
    svc.nat.sync()
    assert is_whole_render(fake(svc).transactions[-1])
    assert fake(svc).dump() == incremental      # the same ruleset either way
    assert elements(svc, "pm_any") == (any_(8080, "10.50.0.2", 80),)
    assert elements(svc, "pm_addr") == (
        Element(("198.51.100.2", "tcp", "443"), ("10.50.0.3", "8443")),)


def test_last_network_gone_deletes_the_table(svc: Service) -> None:
    svc.add_port_mapping("a", "tcp", 8080, 80)
    svc.nat.sync_locked(exclude=frozenset({svc.get_network("n").id}))
    assert fake(svc).list_tables() == [] and fake(svc).dump() == ""
    svc.nat.sync_locked(exclude=frozenset({svc.get_network("n").id}))   # idempotent
