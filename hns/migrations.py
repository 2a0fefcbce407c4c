"""The state store's schema and its migrations, keyed by ``PRAGMA user_version``.

A database's ``user_version`` is the number of migrations applied to it: a new database
runs them all, an older one the ones it lacks, each in the transaction that opens the
store, so a database is never half migrated.  A migration is appended, never changed.

Version 1 is every table as it was when versions started to be counted, and it brings a
database made before that (``user_version`` 0, with whatever columns its release had)
to that shape: its tables are made if missing and the columns added since are added,
with the values rows had before.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate", "version"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS networks (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    subnet TEXT NOT NULL UNIQUE,
    gateway TEXT NOT NULL,
    mtu INTEGER NOT NULL,
    bridge TEXT NOT NULL UNIQUE,
    localhost_forwarding INTEGER NOT NULL DEFAULT 1,
    ignored_ports TEXT NOT NULL DEFAULT '',
    host_address_loopback INTEGER NOT NULL DEFAULT 0,
    firewall INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL DEFAULT 'ready'
);
CREATE TABLE IF NOT EXISTS vms (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    network_id TEXT NOT NULL REFERENCES networks(id),
    ip TEXT NOT NULL,
    mac TEXT NOT NULL UNIQUE,
    netns TEXT NOT NULL UNIQUE,
    host_ifname TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL DEFAULT 'ready',
    UNIQUE (network_id, ip)
);
CREATE TABLE IF NOT EXISTS remembered_subnets (
    name TEXT PRIMARY KEY,
    subnet TEXT NOT NULL
);
"""

# Port mappings: a host (protocol, port) is taken once, where every host address ('')
# overlaps each single one; the trigger makes that a constraint of the database itself.
# Mappings go with their VM (ON DELETE CASCADE); ``down`` keeps copies by VM name.
PORT_MAPPING_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS port_mappings (
        vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        protocol INTEGER NOT NULL CHECK (protocol IN (6, 17)),
        external_port INTEGER NOT NULL CHECK (external_port BETWEEN 1 AND 65535),
        internal_port INTEGER NOT NULL CHECK (internal_port BETWEEN 1 AND 65535),
        host_address TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL DEFAULT 'ready',
        PRIMARY KEY (protocol, external_port, host_address))""",
    "CREATE INDEX IF NOT EXISTS port_mappings_vm ON port_mappings (vm_id)",
    """CREATE TRIGGER IF NOT EXISTS port_mappings_host_port BEFORE INSERT ON port_mappings
    WHEN EXISTS (SELECT 1 FROM port_mappings WHERE protocol = NEW.protocol
                 AND external_port = NEW.external_port
                 AND (host_address = '' OR NEW.host_address = ''
                      OR host_address = NEW.host_address))
    BEGIN SELECT RAISE(ABORT, 'host port already mapped'); END""",
    """CREATE TABLE IF NOT EXISTS remembered_port_mappings (
        vm_name TEXT NOT NULL,
        protocol INTEGER NOT NULL,
        external_port INTEGER NOT NULL,
        internal_port INTEGER NOT NULL,
        host_address TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (vm_name, protocol, external_port, host_address))""",
)

# Static port proxies (hns.daemon.config); 4096 is netsh's default connection cap.
PORT_PROXY_SCHEMA = """
CREATE TABLE IF NOT EXISTS port_proxies (
    protocol TEXT NOT NULL,
    listen_address TEXT NOT NULL,
    listen_port INTEGER NOT NULL,
    kind TEXT NOT NULL,
    connect_address TEXT NOT NULL,
    connect_port INTEGER NOT NULL,
    idle_timeout INTEGER NOT NULL DEFAULT 0,
    max_connections INTEGER NOT NULL DEFAULT 4096,
    PRIMARY KEY (protocol, listen_address, listen_port)
)
"""
PORT_PROXY_ADDED = {
    "idle_timeout": "INTEGER NOT NULL DEFAULT 0",
    "max_connections": "INTEGER NOT NULL DEFAULT 4096",
}


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Columns added, before version 1 was counted, to databases made earlier."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(networks)")}
    if "localhost_forwarding" not in columns:
        db.execute("ALTER TABLE networks ADD COLUMN localhost_forwarding INTEGER NOT NULL "
                   "DEFAULT 1")
    if "ignored_ports" not in columns:
        db.execute("ALTER TABLE networks ADD COLUMN ignored_ports TEXT NOT NULL DEFAULT ''")
    if "host_address_loopback" not in columns:
        db.execute("ALTER TABLE networks ADD COLUMN host_address_loopback INTEGER NOT NULL "
                   "DEFAULT 0")
    if "firewall" not in columns:
        db.execute("ALTER TABLE networks ADD COLUMN firewall INTEGER NOT NULL DEFAULT 1")
    for table in ("networks", "vms", "port_mappings"):
        if "state" not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN state TEXT NOT NULL DEFAULT 'ready'")
    have = {row[1] for row in db.execute("PRAGMA table_info(port_proxies)")}
    for column, definition in PORT_PROXY_ADDED.items():
        if column not in have:
            db.execute(f"ALTER TABLE port_proxies ADD COLUMN {column} {definition}")


def _v1_tables(db: sqlite3.Connection) -> None:
    for statement in SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    for statement in PORT_MAPPING_SCHEMA:
        db.execute(statement)
    db.execute(PORT_PROXY_SCHEMA)
    _add_missing_columns(db)


def _v2_vm_power(db: sqlite3.Connection) -> None:
    """A VM is running or stopped, and may have an idle timeout (ms; NULL: never)."""
    db.execute("ALTER TABLE vms ADD COLUMN power TEXT NOT NULL DEFAULT 'running'")
    db.execute("ALTER TABLE vms ADD COLUMN idle_timeout INTEGER")


def _v3_dns_proxy(db: sqlite3.Connection) -> None:
    """A NAT network may do without the DNS proxy (WSL's dnsProxy=false)."""
    db.execute("ALTER TABLE networks ADD COLUMN dns_proxy INTEGER NOT NULL DEFAULT 1")


def _v4_overlay(db: sqlite3.Connection) -> None:
    """An overlay network has a VNI (NULL for the others)."""
    db.execute("ALTER TABLE networks ADD COLUMN vni INTEGER")


def _v5_proxy_mode(db: sqlite3.Connection) -> None:
    """A static proxy chooses its path: auto, kernel or relay (docs/datapath.md)."""
    db.execute("ALTER TABLE port_proxies ADD COLUMN mode TEXT NOT NULL DEFAULT 'auto'")


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _v1_tables,
    _v2_vm_power,
    _v3_dns_proxy,
    _v4_overlay,
    _v5_proxy_mode,
)
SCHEMA_VERSION = len(MIGRATIONS)


def version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection) -> int:
    """Apply the migrations ``db`` lacks (the caller holds a write transaction); the
    version it had.  A database newer than this code is refused (ValueError)."""
    have = version(db)
    if have > SCHEMA_VERSION:
        raise ValueError(f"the state store has schema version {have}, newer than this "
                         f"hns knows ({SCHEMA_VERSION})")
    for step in MIGRATIONS[have:]:
        step(db)
    if have != SCHEMA_VERSION:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return have
