"""The per-network localhost forwarding switch: model, store (and its migration), CLI
input.  No root, no kernel: the state lives in tmp_path."""

from __future__ import annotations

import sqlite3
import uuid
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from hns import naming
from hns.cli import main
from hns.errors import InvalidRequest
from hns.model import Network, NetworkType, parse_on_off
from hns.store import Store

OLD_NETWORKS = """CREATE TABLE networks (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, type TEXT NOT NULL,
    subnet TEXT NOT NULL UNIQUE, gateway TEXT NOT NULL, mtu INTEGER NOT NULL,
    bridge TEXT NOT NULL UNIQUE)"""


def network(store: Store, name: str, forwarding: bool) -> Network:
    net_id = str(uuid.uuid4())
    subnet = IPv4Network("10.60.0.0/24") if forwarding else IPv4Network("10.61.0.0/24")
    return Network(id=net_id, name=name, type=NetworkType.NAT, subnet=subnet,
                   gateway=next(subnet.hosts()), mtu=1500,
                   bridge=naming.bridge_name(store.instance, net_id),
                   localhost_forwarding=forwarding)


@pytest.mark.parametrize(("text", "value"), [("on", True), ("OFF", False), ("true", True),
                                             ("no", False), ("1", True), (" off ", False)])
def test_on_off(text: str, value: bool) -> None:
    assert parse_on_off(text) is value


def test_on_off_refuses_anything_else() -> None:
    with pytest.raises(InvalidRequest, match="use on or off"):
        parse_on_off("maybe", "--localhost-forwarding")


def test_forwarding_is_on_by_default_and_in_the_json() -> None:
    net = Network(id="x", name="n", type=NetworkType.NAT, subnet=IPv4Network("10.0.0.0/24"),
                  gateway=IPv4Address("10.0.0.1"), mtu=1500, bridge="b")
    assert net.localhost_forwarding is True
    assert net.to_json()["LocalhostForwarding"] is True


def test_the_store_keeps_the_switch(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    on, off = network(store, "on", True), network(store, "off", False)
    with store.write() as tx:
        tx.insert_network(on)
        tx.insert_network(off)
    assert store.networks() == [off, on]
    assert store.network("off").localhost_forwarding is False
    store.close()


def test_an_older_database_gets_the_column_with_forwarding_on(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(state / "hns.db")
    db.execute(OLD_NETWORKS)
    db.execute("INSERT INTO networks VALUES ('id1', 'old', 'NAT', '10.70.0.0/24', "
               "'10.70.0.1', 1500, 'hbxxxx')")
    db.commit()
    db.close()
    store = Store(state)
    try:
        assert store.network("old").localhost_forwarding is True
        columns = [row[1] for row in store.connection.execute("PRAGMA table_info(networks)")]
        assert columns[-7:] == ["localhost_forwarding", "ignored_ports",
                                "host_address_loopback", "firewall", "state", "dns_proxy",
                                "vni"]
        assert store.network("old").ignored_ports == ()
        assert store.network("old").host_address_loopback is False
    finally:
        store.close()
    Store(state).close()                     # opening it again changes nothing


def test_cli_refuses_a_bad_switch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    code = main(["--state-dir", str(state), "network", "create", "n", "--type", "nat",
                 "--localhost-forwarding", "maybe"])
    assert code == 2
    assert "invalid --localhost-forwarding 'maybe': use on or off" in capsys.readouterr().err
    store = Store(state)
    assert store.networks() == []
    store.close()
