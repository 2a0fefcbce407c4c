"""The state store: SQLite in the state directory, the desired state of one instance.

One write transaction per operation (``BEGIN IMMEDIATE``, so concurrent CLI processes
queue on the database lock instead of racing), WAL so readers never wait, and unique
constraints so that a double allocation is impossible even if two writers computed the
same answer.  The store knows nothing of the kernel.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import NamedTuple

from hns import migrations
from hns.errors import AlreadyExists, Conflict, NotFound, StateError
from hns.model import (
    HostPort,
    Network,
    NetworkType,
    PortMapping,
    Power,
    Protocol,
    Vm,
    format_port_list,
    parse_port_list,
)

__all__ = ["ANY_STATE", "INCOMPLETE", "LIVE", "PENDING_OR_READY", "READY", "MappedPort",
           "Store", "Writer"]

PORT_MAPPING_SELECT = """
SELECT v.name, p.protocol, p.external_port, p.internal_port, p.host_address, v.ip,
       v.network_id, v.power
FROM port_mappings p JOIN vms v ON v.id = p.vm_id
"""
# what a reader sees of mappings: complete ones of complete VMs (an incomplete row is the
# leftover of a command that was killed, or one in progress); renders take "adding" too
PORT_MAPPING_OF_READY_VMS = " v.state = 'ready' AND p.state IN "


VM_SELECT = """
SELECT v.id, v.name, n.name, n.id, v.netns, v.ip, n.subnet, n.gateway, v.mac,
       v.host_ifname, n.mtu, v.power, v.idle_timeout
FROM vms v JOIN networks n ON n.id = v.network_id
"""


NETWORK_COLUMNS = ("id, name, type, subnet, gateway, mtu, bridge, localhost_forwarding, "
                   "ignored_ports, host_address_loopback, firewall, dns_proxy, vni")


def _network(row: tuple[object, ...]) -> Network:
    id_, name, type_, subnet, gateway, mtu, bridge, forwarding, ignored, loopback, wall, dns, \
        vni = row
    return Network(id=str(id_), name=str(name), type=NetworkType(type_),
                   subnet=IPv4Network(str(subnet)), gateway=IPv4Address(str(gateway)),
                   mtu=int(str(mtu)), bridge=str(bridge), localhost_forwarding=bool(forwarding),
                   ignored_ports=parse_port_list(str(ignored)),
                   host_address_loopback=bool(loopback), firewall=bool(wall),
                   dns_proxy=bool(dns), vni=None if vni is None else int(str(vni)))


def _vm(row: tuple[object, ...]) -> Vm:
    (id_, name, net_name, net_id, netns, ip, subnet, gateway, mac, host_ifname, mtu, power,
     idle) = row
    return Vm(id=str(id_), name=str(name), network=str(net_name), network_id=str(net_id),
              netns=str(netns), ip=IPv4Address(str(ip)),
              prefixlen=IPv4Network(str(subnet)).prefixlen, gateway=IPv4Address(str(gateway)),
              mac=str(mac), host_ifname=str(host_ifname), mtu=int(str(mtu)),
              power=Power(str(power)), idle_timeout_ms=None if idle is None else int(str(idle)))


class MappedPort(NamedTuple):
    """A port mapping with what the NAT table needs: the VM's address and network."""

    mapping: PortMapping
    target: IPv4Address
    network_id: str
    running: bool = True          # its VM's; a stopped VM's mappings are not in nft


def _port_mapping(row: tuple[object, ...]) -> PortMapping:
    vm, protocol, external, internal, host_address = row
    return PortMapping(vm=str(vm), protocol=Protocol(int(str(protocol))),
                       external_port=int(str(external)), internal_port=int(str(internal)),
                       host_address=IPv4Address(str(host_address)) if host_address else None)


def _mapped_port(row: tuple[object, ...]) -> MappedPort:
    return MappedPort(_port_mapping(row[:5]), IPv4Address(str(row[5])), str(row[6]),
                      str(row[7]) == Power.RUNNING.value)


READY = ("ready",)
LIVE = ("creating", "ready")           # what the kernel should have (deleting: going)
ANY_STATE = ("creating", "ready", "deleting")
INCOMPLETE = ("creating", "deleting")
PENDING_OR_READY = ("adding", "ready")  # mappings the NAT table has
STATES = frozenset({*ANY_STATE, "adding"})


def _state(state: str) -> str:
    if state not in STATES:
        raise ValueError(f"not a state: {state!r}")
    return state


def _in(states: tuple[str, ...]) -> str:
    """An SQL ``(...)`` list of known states (checked, so safe to paste)."""
    return "(" + ", ".join(f"'{_state(s)}'" for s in states) + ")"


def _address(port: HostPort) -> str:
    return str(port.address) if port.address else ""


def _retry_busy(fn: Callable[[], None], patience: float = 60.0) -> None:
    """Run ``fn`` again while SQLite says the database is locked without having waited
    (the journal-mode switch and WAL recovery do that), for up to ``patience`` seconds."""
    deadline = time.monotonic() + patience
    delay = 0.005
    while True:
        try:
            fn()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _integrity(exc: sqlite3.IntegrityError, what: str) -> AlreadyExists:
    return AlreadyExists(f"{what} conflicts with an existing object ({exc})")


class Store:
    """Desired state of one hns instance, in ``<state_dir>/hns.db``."""

    def __init__(self, state_dir: str | os.PathLike[str],
                 tag_taken: Callable[[str], bool] | None = None) -> None:
        """``tag_taken(tag)``: whether kernel objects of that instance tag exist already
        (asked only when a new state directory chooses its tag)."""
        self.state_dir = Path(state_dir)
        self._tag_taken = tag_taken
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.state_dir / "hns.db", timeout=60,
                                       isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout = 60000")
            self._db.execute("PRAGMA foreign_keys = ON")
            _retry_busy(self._setup_schema)
            self.instance = self._meta("instance")
            self.instance_id = self._meta("instance_id")
        except (OSError, sqlite3.Error, ValueError) as exc:
            raise StateError(f"cannot open the state store in {self.state_dir}: {exc}") from None

    def _setup_schema(self) -> None:
        # Switching to WAL takes an exclusive lock and SQLite reports a busy database
        # at once, without waiting, when another process holds it: only switch when the
        # database is not in WAL mode already (it stays so, the mode is persistent).
        mode = self._db.execute("PRAGMA journal_mode").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            self._db.execute("PRAGMA journal_mode = WAL")
        with self.write() as tx:
            db = tx.db
            migrations.migrate(db)
            if db.execute("SELECT 1 FROM meta WHERE key = 'instance'").fetchone() is None:
                db.execute("INSERT INTO meta VALUES ('instance', ?)", (self._new_tag(),))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('instance_id', ?)",
                       (secrets.token_hex(16),))

    def _new_tag(self) -> str:
        """A random instance tag no kernel object of this machine carries yet: the tag
        is only 16 bits, and names of namespaces are global."""
        for _ in range(64):
            tag = secrets.token_hex(2)
            if self._tag_taken is None or not self._tag_taken(tag):
                return tag
        raise StateError("no free instance tag found (64 tries): too many hns instances")

    def close(self) -> None:
        self._db.close()

    @property
    def connection(self) -> sqlite3.Connection:
        """The connection, for reads of modules keeping tables of their own."""
        return self._db

    def _meta(self, key: str) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise StateError(f"state store has no {key}")
        return str(row[0])

    def meta(self, key: str) -> str | None:
        """A value of the ``meta`` table (None: not set)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str | None) -> None:
        """Set (None: remove) a value of the ``meta`` table, in a transaction of its own."""
        with self.write() as tx:
            if value is None:
                tx.db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                tx.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    @contextlib.contextmanager
    def write(self) -> Iterator[Writer]:
        """One write transaction, the database lock held from the start (``BEGIN
        IMMEDIATE``): its :class:`Writer`.  Reads of the store inside it see its writes."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield Writer(self._db)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    @contextlib.contextmanager
    def lock(self, name: str, shared: bool = False) -> Iterator[None]:
        """A lock between processes of this instance (a flock on a file), exclusive or
        ``shared``.  It goes with the process: a killed holder releases it."""
        fd = self._lock_fd(name)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def try_lock(self, name: str) -> Iterator[bool]:
        """The exclusive lock if free now (True), else False at once."""
        fd = self._lock_fd(name)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
            else:
                yield True
        finally:
            os.close(fd)

    def _lock_fd(self, name: str) -> int:
        return os.open(self.state_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                       0o600)

    def incomplete_networks(self) -> list[Network]:
        """Networks whose create or delete did not finish (killed, or in progress)."""
        rows = self._db.execute(f"SELECT {NETWORK_COLUMNS} FROM networks "
                                "WHERE state != 'ready' ORDER BY name")
        return [_network(r) for r in rows]

    def incomplete_vms(self) -> list[Vm]:
        rows = self._db.execute(VM_SELECT + " WHERE v.state != 'ready' ORDER BY v.name")
        return [_vm(r) for r in rows]

    def incomplete_port_mappings(self) -> list[MappedPort]:
        rows = self._db.execute(PORT_MAPPING_SELECT + " WHERE p.state != 'ready'")
        return [_mapped_port(r) for r in rows]

    # networks

    def networks(self, states: tuple[str, ...] = READY) -> list[Network]:
        """The networks in ``states`` (default: complete ones only)."""
        rows = self._db.execute(
            f"SELECT {NETWORK_COLUMNS} FROM networks WHERE state IN {_in(states)} "
            "ORDER BY name")
        return [_network(r) for r in rows]

    def find_network(self, name: str, states: tuple[str, ...] = READY) -> Network | None:
        row = self._db.execute(
            f"SELECT {NETWORK_COLUMNS} FROM networks WHERE name = ? AND state IN "
            f"{_in(states)}", (name,)).fetchone()
        return _network(row) if row else None

    def network(self, name: str) -> Network:
        net = self.find_network(name)
        if net is None:
            raise NotFound(f"network {name!r} does not exist")
        return net

    def remembered_subnet(self, name: str) -> IPv4Network | None:
        row = self._db.execute("SELECT subnet FROM remembered_subnets WHERE name = ?",
                               (name,)).fetchone()
        return IPv4Network(row[0]) if row else None

    # VMs

    def vms(self, network_id: str | None = None,
            states: tuple[str, ...] = READY) -> list[Vm]:
        """The VMs in ``states`` (default: complete ones only)."""
        where = f" WHERE v.state IN {_in(states)}"
        if network_id is None:
            rows = self._db.execute(VM_SELECT + where + " ORDER BY v.name")
        else:
            rows = self._db.execute(VM_SELECT + where + " AND n.id = ? ORDER BY v.name",
                                    (network_id,))
        return [_vm(r) for r in rows]

    def find_vm(self, name: str, states: tuple[str, ...] = READY) -> Vm | None:
        row = self._db.execute(
            VM_SELECT + f" WHERE v.name = ? AND v.state IN {_in(states)}", (name,)).fetchone()
        return _vm(row) if row else None

    def vm(self, name: str) -> Vm:
        vm = self.find_vm(name)
        if vm is None:
            raise NotFound(f"vm {name!r} does not exist")
        return vm

    def taken_ips(self, network_id: str) -> set[IPv4Address]:
        rows = self._db.execute("SELECT ip FROM vms WHERE network_id = ?", (network_id,))
        return {IPv4Address(r[0]) for r in rows}

    def taken_macs(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT mac FROM vms")}

    # port mappings

    def port_mappings(self, vm_id: str | None = None,
                      states: tuple[str, ...] = READY) -> list[MappedPort]:
        """Mappings in ``states`` (default: complete ones) of complete VMs."""
        order = " ORDER BY v.name, p.protocol, p.external_port, p.host_address"
        where = PORT_MAPPING_OF_READY_VMS + _in(states)
        if vm_id is None:
            rows = self._db.execute(PORT_MAPPING_SELECT + " WHERE" + where + order)
        else:
            rows = self._db.execute(PORT_MAPPING_SELECT + " WHERE p.vm_id = ? AND"
                                    + where + order, (vm_id,))
        return [_mapped_port(r) for r in rows]

    def vm_port_mappings(self, vm_id: str) -> list[MappedPort]:
        """Every mapping row of a VM, whatever its state or the VM's."""
        rows = self._db.execute(PORT_MAPPING_SELECT + " WHERE p.vm_id = ?", (vm_id,))
        return [_mapped_port(r) for r in rows]

    def port_mapping_conflict(self, port: HostPort) -> MappedPort | None:
        """A mapping that overlaps this host port (an index lookup, whatever the count)."""
        address = _address(port)
        row = self._db.execute(
            PORT_MAPPING_SELECT + " WHERE p.protocol = ? AND p.external_port = ? "
            "AND (p.host_address = '' OR ? = '' OR p.host_address = ?) LIMIT 1",
            (port.protocol.value, port.port, address, address)).fetchone()
        return _mapped_port(row) if row else None

    def find_port_mapping(self, port: HostPort) -> MappedPort | None:
        """The mapping of exactly this host port (protocol, port and address)."""
        row = self._db.execute(
            PORT_MAPPING_SELECT + " WHERE p.protocol = ? AND p.external_port = ? "
            "AND p.host_address = ?", (port.protocol.value, port.port, _address(port))).fetchone()
        return _mapped_port(row) if row else None

    def remembered_port_mappings(self, vm_name: str) -> list[PortMapping]:
        rows = self._db.execute(
            "SELECT vm_name, protocol, external_port, internal_port, host_address "
            "FROM remembered_port_mappings WHERE vm_name = ? "
            "ORDER BY protocol, external_port, host_address", (vm_name,))
        return [_port_mapping(r) for r in rows]


class Writer:
    """The write methods of one transaction (:meth:`Store.write`); ``db``: its
    connection, for modules keeping tables of their own."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def set_state(self, kind: str, object_id: str, state: str) -> None:
        """Mark a network or VM (``kind``) ``creating``, ``ready`` or ``deleting``."""
        table = {"network": "networks", "vm": "vms"}[kind]
        self.db.execute(f"UPDATE {table} SET state = ? WHERE id = ?", (_state(state), object_id))

    def insert_network(self, net: Network, state: str = "ready") -> None:
        try:
            self.db.execute(f"INSERT INTO networks ({NETWORK_COLUMNS}, state) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (net.id, net.name, net.type.value, str(net.subnet), str(net.gateway),
                             net.mtu, net.bridge, int(net.localhost_forwarding),
                             format_port_list(net.ignored_ports), int(net.host_address_loopback),
                             int(net.firewall), int(net.dns_proxy), net.vni, _state(state)))
            self.db.execute("INSERT OR REPLACE INTO remembered_subnets VALUES (?, ?)",
                            (net.name, str(net.subnet)))
        except sqlite3.IntegrityError as exc:
            raise _integrity(exc, f"network {net.name}") from None

    def delete_network(self, network_id: str) -> None:
        self.db.execute("DELETE FROM vms WHERE network_id = ?", (network_id,))
        self.db.execute("DELETE FROM networks WHERE id = ?", (network_id,))

    def insert_vm(self, vm: Vm, state: str = "ready") -> None:
        try:
            self.db.execute("INSERT INTO vms (id, name, network_id, ip, mac, netns, "
                            "host_ifname, state, power, idle_timeout) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (vm.id, vm.name, vm.network_id, str(vm.ip), vm.mac, vm.netns,
                             vm.host_ifname, _state(state), vm.power.value, vm.idle_timeout_ms))
        except sqlite3.IntegrityError as exc:
            raise _integrity(exc, f"vm {vm.name}") from None

    def delete_vm(self, vm_id: str) -> None:
        self.db.execute("DELETE FROM vms WHERE id = ?", (vm_id,))

    def set_power(self, vm_id: str, power: Power) -> None:
        self.db.execute("UPDATE vms SET power = ? WHERE id = ?", (power.value, vm_id))

    def set_network_options(self, net: Network) -> None:
        """The options a network may change while it lives (``hnsctl reload``)."""
        self.db.execute("UPDATE networks SET localhost_forwarding = ?, ignored_ports = ?, "
                        "host_address_loopback = ? WHERE id = ?",
                        (int(net.localhost_forwarding), format_port_list(net.ignored_ports),
                         int(net.host_address_loopback), net.id))

    def set_idle_timeout(self, vm_id: str, idle_timeout_ms: int | None) -> None:
        self.db.execute("UPDATE vms SET idle_timeout = ? WHERE id = ?",
                        (idle_timeout_ms, vm_id))

    # port mappings

    def insert_port_mappings(self, vm_ids: Mapping[str, str],
                             mappings: Iterable[PortMapping], state: str = "ready") -> None:
        """Insert mappings; ``vm_ids`` maps each VM name to its id."""
        try:
            self.db.executemany("INSERT INTO port_mappings VALUES (?, ?, ?, ?, ?, ?)",
                                ((vm_ids[m.vm], m.protocol.value, m.external_port, m.internal_port,
                                  _address(m.host_port), _state(state)) for m in mappings))
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"a host port is already mapped ({exc})") from None

    def set_port_mappings_state(self, ports: Iterable[HostPort], state: str) -> None:
        """Mark mappings ``adding``, ``ready`` or ``deleting``."""
        self.db.executemany("UPDATE port_mappings SET state = ? WHERE protocol = ? AND "
                            "external_port = ? AND host_address = ?",
                            ((_state(state), p.protocol.value, p.port, _address(p)) for p in ports))

    def delete_port_mappings(self, ports: Iterable[HostPort]) -> None:
        self.db.executemany("DELETE FROM port_mappings WHERE protocol = ? AND external_port = ? "
                            "AND host_address = ?",
                            ((p.protocol.value, p.port, _address(p)) for p in ports))

    def remember_port_mappings(self, vm_name: str, mappings: Iterable[PortMapping]) -> None:
        """Keep copies under the VM's name (replacing older ones), for ``up``."""
        self.forget_port_mappings(vm_name)
        self.db.executemany("INSERT INTO remembered_port_mappings VALUES (?, ?, ?, ?, ?)",
                            ((vm_name, m.protocol.value, m.external_port, m.internal_port,
                              _address(m.host_port)) for m in mappings))

    def forget_port_mappings(self, vm_name: str) -> None:
        self.db.execute("DELETE FROM remembered_port_mappings WHERE vm_name = ?", (vm_name,))
