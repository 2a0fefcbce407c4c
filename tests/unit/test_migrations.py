"""The store's migrations: every earlier shape of the database opens as the current one,
its rows kept, and a database newer than the code is refused."""

from __future__ import annotations

import sqlite3
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from hns import migrations
from hns.errors import StateError
from hns.store import Store

# The networks table as releases had it, oldest first: each added a column.
NETWORK_COLUMNS = [
    "id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, type TEXT NOT NULL, "
    "subnet TEXT NOT NULL UNIQUE, gateway TEXT NOT NULL, mtu INTEGER NOT NULL, "
    "bridge TEXT NOT NULL UNIQUE",
    "localhost_forwarding INTEGER NOT NULL DEFAULT 1",
    "ignored_ports TEXT NOT NULL DEFAULT ''",
    "host_address_loopback INTEGER NOT NULL DEFAULT 0",
]
OLD_VMS = ("CREATE TABLE vms (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, "
           "network_id TEXT NOT NULL REFERENCES networks(id), ip TEXT NOT NULL, "
           "mac TEXT NOT NULL UNIQUE, netns TEXT NOT NULL UNIQUE, "
           "host_ifname TEXT NOT NULL UNIQUE, UNIQUE (network_id, ip))")
OLD_PROXIES = ("CREATE TABLE port_proxies (protocol TEXT NOT NULL, listen_address TEXT "
               "NOT NULL, listen_port INTEGER NOT NULL, kind TEXT NOT NULL, "
               "connect_address TEXT NOT NULL, connect_port INTEGER NOT NULL, "
               "PRIMARY KEY (protocol, listen_address, listen_port))")


def old_database(path: Path, network_columns: int, with_mappings: bool) -> None:
    """A state directory as a release before versions were counted made it."""
    columns = ", ".join(NETWORK_COLUMNS[:network_columns])
    values = ["'n-1'", "'WSL'", "'NAT'", "'172.16.0.0/20'", "'172.16.0.1'", "1500",
              "'hbab12n1'", "1", "''", "0"][:7 + network_columns - 1]
    with sqlite3.connect(path / "hns.db") as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('schema', '1'), ('instance', 'ab12')")
        db.execute(f"CREATE TABLE networks ({columns})")
        db.execute(f"INSERT INTO networks VALUES ({', '.join(values)})")
        db.execute(OLD_VMS)
        db.execute("INSERT INTO vms VALUES ('v-1', 'wsl', 'n-1', '172.16.0.2', "
                   "'00:15:5d:00:00:01', 'hns-ab12-wsl', 'hvab12v1')")
        db.execute("CREATE TABLE remembered_subnets (name TEXT PRIMARY KEY, "
                   "subnet TEXT NOT NULL)")
        if with_mappings:
            db.execute("CREATE TABLE port_mappings (vm_id TEXT NOT NULL, protocol INTEGER "
                       "NOT NULL, external_port INTEGER NOT NULL, internal_port INTEGER "
                       "NOT NULL, host_address TEXT NOT NULL DEFAULT '', "
                       "PRIMARY KEY (protocol, external_port, host_address))")
            db.execute("INSERT INTO port_mappings VALUES ('v-1', 6, 8080, 80, '')")
            db.execute(OLD_PROXIES)


@pytest.mark.parametrize("with_mappings", [False, True])
@pytest.mark.parametrize("network_columns", range(1, len(NETWORK_COLUMNS) + 1))
def test_every_earlier_shape_opens_as_the_current_one(tmp_path: Path, network_columns: int,
                                                      with_mappings: bool) -> None:
    old_database(tmp_path, network_columns, with_mappings)
    store = Store(tmp_path)
    try:
        assert migrations.version(store.connection) == migrations.SCHEMA_VERSION
        assert store.instance == "ab12" and len(store.instance_id) == 32
        net = store.network("WSL")
        assert net.subnet == IPv4Network("172.16.0.0/20") and net.firewall
        assert net.localhost_forwarding and not net.host_address_loopback
        vm = store.vm("wsl")
        assert vm.ip == IPv4Address("172.16.0.2")
        mapped = [m.mapping.describe() for m in store.port_mappings()]
        assert mapped == (["tcp *:8080 -> vm wsl port 80"] if with_mappings else [])
        proxies = store.connection.execute("SELECT * FROM port_proxies").fetchall()
        assert proxies == []
    finally:
        store.close()


def test_a_migrated_database_is_left_alone_when_opened_again(tmp_path: Path) -> None:
    old_database(tmp_path, 1, True)
    Store(tmp_path).close()
    with sqlite3.connect(tmp_path / "hns.db") as db:
        before = db.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    store = Store(tmp_path)
    try:
        after = store.connection.execute("SELECT sql FROM sqlite_master ORDER BY name")
        assert after.fetchall() == before
        assert store.vm("wsl").name == "wsl"
    finally:
        store.close()


def test_a_new_database_gets_the_latest_version(tmp_path: Path) -> None:
    store = Store(tmp_path)
    try:
        assert migrations.version(store.connection) == migrations.SCHEMA_VERSION
    finally:
        store.close()


def test_a_database_newer_than_this_code_is_refused(tmp_path: Path) -> None:
    Store(tmp_path).close()
    with sqlite3.connect(tmp_path / "hns.db") as db:
        db.execute(f"PRAGMA user_version = {migrations.SCHEMA_VERSION + 1}")
    with pytest.raises(StateError, match="newer than this hns knows"):
        Store(tmp_path)
