"""hns.store: the SQLite state store in tmp_path.  No root, no kernel."""

from __future__ import annotations

import fcntl
import os
import random
import re
import stat
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from hns import ipam, naming
from hns.errors import AlreadyExists, InvalidRequest, NotFound, StateError
from hns.model import Network, NetworkType, Vm
from hns.store import Store

THREADS = 20


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state")
    yield s
    s.close()


def make_network(store: Store, name: str = "WSL", subnet: str = "172.16.0.0/20",
                 net_id: str | None = None, mtu: int = 1500) -> Network:
    net_id = net_id or str(uuid.uuid4())
    net = IPv4Network(subnet)
    return Network(id=net_id, name=name, type=NetworkType.NAT, subnet=net,
                   gateway=ipam.default_gateway(net), mtu=mtu,
                   bridge=naming.bridge_name(store.instance, net_id))


def make_vm(store: Store, net: Network, name: str, ip: str, mac: str,
            vm_id: str | None = None) -> Vm:
    vm_id = vm_id or str(uuid.uuid4())
    return Vm(id=vm_id, name=name, network=net.name, network_id=net.id,
              netns=naming.vm_netns_name(store.instance, name), ip=IPv4Address(ip),
              prefixlen=net.subnet.prefixlen, gateway=net.gateway, mac=mac,
              host_ifname=naming.host_veth_name(store.instance, vm_id), mtu=net.mtu)


def add_network(store: Store, name: str = "WSL", subnet: str = "172.16.0.0/20",
                mtu: int = 1500) -> Network:
    net = make_network(store, name, subnet, mtu=mtu)
    with store.write() as tx:
        tx.insert_network(net)
    return net


def add_vm(store: Store, net: Network, name: str, ip: str, mac: str) -> Vm:
    vm = make_vm(store, net, name, ip, mac)
    with store.write() as tx:
        tx.insert_vm(vm)
    return vm


# opening


def test_instance_id_is_four_hex_chars_and_stable(tmp_path: Path) -> None:
    first = Store(tmp_path)
    instance = first.instance
    first.close()
    assert re.fullmatch(r"[0-9a-f]{4}", instance)
    again = Store(tmp_path)
    assert again.instance == instance
    again.close()


def test_state_dir_is_created_private(tmp_path: Path) -> None:
    state = tmp_path / "a" / "b"
    Store(state).close()
    assert (state / "hns.db").is_file()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_two_state_dirs_are_two_instances(tmp_path: Path) -> None:
    stores = [Store(tmp_path / str(i)) for i in range(2)]
    try:
        add_network(stores[0])
        assert stores[1].networks() == []
    finally:
        for s in stores:
            s.close()


def test_state_dir_that_cannot_be_made_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError, match="cannot open the state store"):
        Store(tmp_path / "file" / "state")


def test_corrupt_database_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "hns.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateError, match="cannot open the state store"):
        Store(tmp_path)


# networks


def test_insert_find_list_networks(store: Store) -> None:
    b = add_network(store, name="b", subnet="172.16.16.0/20")
    a = add_network(store, name="a", subnet="10.50.0.0/24", mtu=9000)
    assert store.find_network("a") == a
    assert store.network("b") == b
    assert store.networks() == [a, b]  # ordered by name
    assert store.find_network("c") is None


def test_network_roundtrip_is_exact(store: Store) -> None:
    net = make_network(store, name="x.y-z_1", subnet="192.168.4.0/22")
    with store.write() as tx:
        tx.insert_network(net)
        assert store.find_network("x.y-z_1") == net
    assert store.network("x.y-z_1") == net


def test_missing_network_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="'nope' does not exist"):
        store.network("nope")


@pytest.mark.parametrize("clash", ["name", "subnet", "bridge", "id"])
def test_duplicate_network_raises_already_exists(store: Store, clash: str) -> None:
    first = add_network(store, name="one", subnet="10.1.0.0/16")
    second = make_network(store, name="two", subnet="10.2.0.0/16")
    second = Network(**{**second.__dict__, clash: getattr(first, clash)})
    with pytest.raises(AlreadyExists), store.write() as tx:
        tx.insert_network(second)
    assert store.networks() == [first]


def test_remembered_subnet_survives_delete_network(store: Store) -> None:
    net = add_network(store, name="WSL", subnet="172.20.0.0/20")
    vm = add_vm(store, net, "wsl", "172.20.0.2", "00:15:5d:00:00:01")
    with store.write() as tx:
        tx.delete_network(net.id)
    assert store.find_network("WSL") is None
    assert store.find_vm(vm.name) is None  # VMs go with their network
    with store.write() as tx:
        assert store.remembered_subnet("WSL") == IPv4Network("172.20.0.0/20")
        assert store.remembered_subnet("other") is None


def test_remembered_subnet_follows_the_latest_network(store: Store) -> None:
    net = add_network(store, name="WSL", subnet="172.20.0.0/20")
    with store.write() as tx:
        tx.delete_network(net.id)
    add_network(store, name="WSL", subnet="172.21.0.0/20")
    with store.write() as tx:
        assert store.remembered_subnet("WSL") == IPv4Network("172.21.0.0/20")


# VMs


def test_insert_find_list_vms(store: Store) -> None:
    n1 = add_network(store, name="n1", subnet="10.1.0.0/24")
    n2 = add_network(store, name="n2", subnet="10.2.0.0/24")
    b = add_vm(store, n1, "b", "10.1.0.2", "00:15:5d:00:00:01")
    a = add_vm(store, n1, "a", "10.1.0.3", "00:15:5d:00:00:02")
    c = add_vm(store, n2, "c", "10.2.0.2", "00:15:5d:00:00:03")
    assert store.find_vm("a") == a
    assert store.vm("c") == c
    assert store.vms() == [a, b, c]
    assert store.vms(n1.id) == [a, b]
    assert store.vms(n2.id) == [c]
    assert store.find_vm("d") is None
    assert store.taken_ips(n1.id) == {IPv4Address("10.1.0.2"), IPv4Address("10.1.0.3")}
    assert store.taken_macs() == {"00:15:5d:00:00:01", "00:15:5d:00:00:02",
                                  "00:15:5d:00:00:03"}


def test_missing_vm_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="vm 'nope' does not exist"):
        store.vm("nope")


def test_same_ip_on_two_networks_is_fine(store: Store) -> None:
    n1 = add_network(store, name="n1", subnet="10.1.0.0/24")
    n2 = add_network(store, name="n2", subnet="10.1.1.0/24")
    add_vm(store, n1, "a", "10.1.0.2", "00:15:5d:00:00:01")
    add_vm(store, n2, "b", "10.1.0.2", "00:15:5d:00:00:02")
    assert len(store.vms()) == 2


@pytest.mark.parametrize("clash", ["id", "name", "ip", "mac", "netns", "host_ifname"])
def test_duplicate_vm_raises_already_exists(store: Store, clash: str) -> None:
    net = add_network(store)
    first = add_vm(store, net, "a", "172.16.0.2", "00:15:5d:00:00:01")
    second = make_vm(store, net, "b", "172.16.0.3", "00:15:5d:00:00:02")
    second = Vm(**{**second.__dict__, clash: getattr(first, clash)})
    with pytest.raises(AlreadyExists), store.write() as tx:
        tx.insert_vm(second)
    assert store.vms() == [first]


def test_delete_vm(store: Store) -> None:
    net = add_network(store)
    vm = add_vm(store, net, "a", "172.16.0.2", "00:15:5d:00:00:01")
    with store.write() as tx:
        tx.delete_vm(vm.id)
        tx.delete_vm(vm.id)  # idempotent
    assert store.vms() == []
    assert store.network("WSL") == net


# transactions


def test_transaction_rolls_back_on_exception(store: Store) -> None:
    with pytest.raises(RuntimeError), store.write() as tx:
        tx.insert_network(make_network(store))
        raise RuntimeError("boom")
    assert store.networks() == []
    with store.write() as tx:
        assert store.remembered_subnet("WSL") is None


def test_failed_insert_rolls_back_the_whole_transaction(store: Store) -> None:
    net = add_network(store, name="a", subnet="10.1.0.0/16")
    with pytest.raises(AlreadyExists), store.write() as tx:
        tx.insert_network(make_network(store, name="b", subnet="10.2.0.0/16"))
        tx.insert_network(make_network(store, name="a", subnet="10.3.0.0/16"))
    assert store.networks() == [net]


def test_store_usable_after_rollback(store: Store) -> None:
    with pytest.raises(KeyboardInterrupt), store.write():
        raise KeyboardInterrupt
    net = add_network(store)
    assert store.networks() == [net]


def test_committed_writes_are_seen_by_another_store(tmp_path: Path) -> None:
    one, two = Store(tmp_path), Store(tmp_path)
    try:
        net = add_network(one)
        assert two.network("WSL") == net
    finally:
        one.close()
        two.close()


# concurrency


def _run_together(count: int, work: Callable[[int], None]) -> list[BaseException]:
    """Run ``work(i)`` on ``count`` threads released together; the exceptions raised."""
    barrier = threading.Barrier(count, timeout=60)

    def task(i: int) -> None:
        barrier.wait()
        work(i)

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(task, i) for i in range(count)]
        return [exc for f in futures if (exc := f.exception(timeout=120)) is not None]


def test_concurrent_writers_each_with_their_own_store(tmp_path: Path) -> None:
    setup = Store(tmp_path)
    net = add_network(setup, subnet="10.50.0.0/24")
    setup.close()

    def insert(i: int) -> None:
        own = Store(tmp_path)
        try:
            vm = make_vm(own, net, f"vm{i}", f"10.50.0.{i + 2}", f"00:15:5d:00:01:{i:02x}")
            with own.write() as tx:
                tx.insert_vm(vm)
        finally:
            own.close()

    assert _run_together(THREADS, insert) == []
    check = Store(tmp_path)
    try:
        assert sorted(v.name for v in check.vms()) == sorted(f"vm{i}" for i in range(THREADS))
    finally:
        check.close()


def test_concurrent_allocations_never_collide(tmp_path: Path) -> None:
    """The service's pattern: read what is taken and insert, in one transaction."""
    setup = Store(tmp_path)
    net = add_network(setup, subnet="10.50.0.0/24")
    setup.close()

    def allocate(i: int) -> None:
        own = Store(tmp_path)
        try:
            with own.write() as tx:
                ip = ipam.allocate_ip(net.subnet, net.gateway, own.taken_ips(net.id))
                mac = ipam.allocate_mac(own.taken_macs(), rng=random.Random(i))
                tx.insert_vm(make_vm(own, net, f"vm{i}", str(ip), mac))
        finally:
            own.close()

    assert _run_together(THREADS, allocate) == []
    check = Store(tmp_path)
    try:
        ips = {v.ip for v in check.vms()}
    finally:
        check.close()
    assert ips == {IPv4Address(f"10.50.0.{i}") for i in range(2, THREADS + 2)}


def test_concurrent_first_open_agrees_on_the_instance(tmp_path: Path) -> None:
    instances: list[str] = []
    lock = threading.Lock()

    def open_store(_: int) -> None:
        s = Store(tmp_path / "fresh")
        with lock:
            instances.append(s.instance)
        s.close()

    assert _run_together(THREADS, open_store) == []
    assert len(instances) == THREADS
    assert len(set(instances)) == 1


# the file lock


def test_lock_is_exclusive_between_open_files(store: Store) -> None:
    path = store.state_dir / "nft.lock"
    with store.lock("nft"):
        fd = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    finally:
        os.close(fd)


def test_vm_on_an_unknown_network_is_refused(store: Store) -> None:
    ghost = make_network(store)  # never inserted
    with pytest.raises(InvalidRequest), store.write() as tx:
        tx.insert_vm(make_vm(store, ghost, "a", "172.16.0.2", "00:15:5d:00:00:01"))
    assert store.vms() == []
