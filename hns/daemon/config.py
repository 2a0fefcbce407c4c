"""Static port proxies in the state store (table ``port_proxies``).

The CLI writes here; the daemon reads and serves.  ``data_version`` lets the daemon see
that another process committed a change without reading the table every time.  The
table is made and migrated with the rest of the store (:mod:`hns.migrations`), so
opening it writes nothing (``hnsctl status`` takes no write lock).
"""

from __future__ import annotations

import ipaddress
import sqlite3
from collections.abc import Set

from hns.daemon.netsh import (
    IPAddress,
    PortProxy,
    ProxyKey,
    conflicts,
    loop_of,
)
from hns.errors import AlreadyExists, Conflict, InvalidRequest
from hns.model import NetworkType
from hns.store import Store

__all__ = ["ProxyConfig", "forwarded_subnets"]

COLUMNS = ("kind, protocol, listen_address, listen_port, connect_address, connect_port, "
           "idle_timeout, max_connections, mode")



def _proxy(row: tuple[object, ...]) -> PortProxy:
    kind, protocol, listen, lport, connect, cport, idle, cap, mode = row
    return PortProxy(str(kind), str(protocol), ipaddress.ip_address(str(listen)),
                     int(str(lport)), ipaddress.ip_address(str(connect)), int(str(cport)),
                     int(str(idle)), int(str(cap)), str(mode))


def _describe_loop(path: list[PortProxy]) -> str:
    new = path[0]
    target = f"{new.connect_address}:{new.connect_port}"
    if len(path) == 1:
        return (f"{new.name} would connect to its own listening socket ({target}): "
                "a loop")
    through = " -> ".join(p.name for p in path[1:])
    return f"{new.name} would connect back to itself through {through}: a loop"


def forwarded_subnets(store: Store) -> list[ipaddress.IPv4Network]:
    """The subnets of the instance's NAT and overlay networks: where the host routes to
    VMs, so the kernel path of a proxy can reach them."""
    return [n.subnet for n in store.networks()
            if n.type in (NetworkType.NAT, NetworkType.OVERLAY)]


class ProxyConfig:
    """The configured port proxies of one hns instance."""

    def __init__(self, store: Store) -> None:
        self.store = store      # the table is the store's (hns.migrations): nothing to make

    def _db(self) -> sqlite3.Connection:
        return self.store.connection

    def list(self) -> list[PortProxy]:
        rows = self._db().execute(
            f"SELECT {COLUMNS} FROM port_proxies ORDER BY kind, protocol, listen_port, "
            "listen_address")
        return [_proxy(r) for r in rows]

    def data_version(self) -> int:
        return int(self._db().execute("PRAGMA data_version").fetchone()[0])

    def add(self, proxy: PortProxy, replace: bool = False,
            local: Set[IPAddress] = frozenset()) -> None:
        """Add a proxy; ``replace`` (netsh ``set``) overwrites the one on the same socket.

        A proxy that would connect to its own listening socket, directly or through other
        proxies, is refused; ``local`` are the host namespace's addresses (a wildcard
        listener is reached at each of them)."""
        with self.store.write() as tx:
            rows = tx.db.execute(f"SELECT {COLUMNS} FROM port_proxies")
            existing = [_proxy(r) for r in rows]
            if replace:
                existing = [p for p in existing if p.key != proxy.key]
            clash = conflicts(proxy, existing)
            if clash is not None:
                if clash.key == proxy.key:
                    raise AlreadyExists(f"{clash.name} already exists (use 'set' to change it)")
                raise Conflict(f"{proxy.name} would clash with {clash.name}")
            loop = loop_of(proxy, existing, local)
            if loop is not None:
                raise InvalidRequest(_describe_loop(loop))
            tx.db.execute("DELETE FROM port_proxies WHERE protocol = ? AND listen_address = ? "
                          "AND listen_port = ?", (proxy.protocol, str(proxy.listen_address),
                                                  proxy.listen_port))
            tx.db.execute(f"INSERT INTO port_proxies ({COLUMNS}) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          (proxy.kind, proxy.protocol, str(proxy.listen_address),
                           proxy.listen_port, str(proxy.connect_address), proxy.connect_port,
                           proxy.idle_timeout, proxy.max_connections, proxy.mode))

    def delete(self, kind: str, key: ProxyKey) -> bool:
        with self.store.write() as tx:
            cur = tx.db.execute("DELETE FROM port_proxies WHERE kind = ? AND protocol = ? AND "
                                "listen_address = ? AND listen_port = ?",
                                (kind, key.protocol, key.listen_address, key.listen_port))
            return bool(cur.rowcount > 0)

    def reset(self) -> int:
        with self.store.write() as tx:
            return int(tx.db.execute("DELETE FROM port_proxies").rowcount)
