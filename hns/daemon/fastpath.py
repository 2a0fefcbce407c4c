"""The kernel data path as a component of the daemon: the fast table
(``inet hns-<tag>-fast``, :mod:`nat.fastpath`) and the bridges' ``route_localnet``.

Localhost forwarding (:mod:`hns.daemon.forwarder`) and the static proxies
(:mod:`hns.daemon.proxies`) hand their translations here by key: :meth:`FastPath.add`
and :meth:`FastPath.remove` are one nft element transaction each (where nft refuses it,
the whole table is rendered again).  ``route_localnet`` is set on a bridge while some
localhost translation leads into it, and set back when none does or the daemon stops;
the table's guard drops what arrives elsewhere than ``lo`` for 127.0.0.0/8 or ::1 for as
long as the table exists, which is as long as the daemon runs.  The table is made at the
first ``reconcile``, checked every ``heal_interval`` (put back if something removed it)
and destroyed at ``close``.  See docs/datapath.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from hns.errors import HnsError
from hns.naming import instance_alias_prefix, nft_table_name
from hns.store import Store
from nat.fastpath import FastEntry, elements_by_map, fast_table
from nat.nft import NftRunner
from nat.transaction import Transaction
from portproxy.engine import Engine, TimerHandle

__all__ = ["HEAL_INTERVAL", "FastPath", "write_route_localnet"]

log = logging.getLogger("hns.daemon")

HEAL_INTERVAL = 10.0      # s between two checks that the table is still there


def write_route_localnet(bridge: str, on: bool) -> None:
    """``net.ipv4.conf.<bridge>.route_localnet`` of this thread's namespace."""
    path = Path("/proc/sys/net/ipv4/conf", bridge, "route_localnet")
    path.write_text("1\n" if on else "0\n")


class FastPath:
    """The daemon's kernel translations (a daemon component)."""

    def __init__(self, engine: Engine, store: Store, nft: NftRunner, *,
                 heal_interval: float = HEAL_INTERVAL,
                 localnet: Callable[[str, bool], None] = write_route_localnet) -> None:
        self.engine = engine
        self.store = store
        self.nft = nft
        self.table = f"{nft_table_name(store.instance)}-fast"
        self.owner = instance_alias_prefix(store.instance_id).rstrip(":")
        self.heal_interval = heal_interval
        self._localnet = localnet
        self._entries: dict[Hashable, FastEntry] = {}
        self._bridges: dict[Hashable, str] = {}   # localhost key -> the bridge it enters
        self._localnet_on: set[str] = set()
        self._made = False
        self._closed = False
        self._timer: TimerHandle | None = None

    # -- the Component protocol -----------------------------------------------------------

    def reconcile(self) -> None:
        if self._closed or self._made:
            return
        # a daemon that was killed may have left route_localnet on: nothing needs it yet
        for net in self.store.networks():
            self._set_localnet(net.bridge, False)
        self._render()
        if self._timer is None:
            self._timer = self.engine.call_later(self.heal_interval, self._heal)

    def status(self) -> dict[str, Any]:
        return {"FastPath": {"Table": f"inet {self.table}", "Ready": self._made,
                             "Entries": len(self._entries),
                             "RouteLocalnet": sorted(self._localnet_on)}}

    def close(self) -> None:
        """Destroy the table and set ``route_localnet`` back (later calls do nothing)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            self.nft.run(Transaction().destroy_table("inet", self.table))
        except HnsError as exc:
            log.warning("cannot delete nft table %s: %s", self.table, exc)
        for bridge in sorted(self._localnet_on):
            self._set_localnet(bridge, False)
        self._entries.clear()
        self._bridges.clear()

    # -- translations ---------------------------------------------------------------------

    def add(self, key: Hashable, entry: FastEntry, bridge: str | None = None) -> bool:
        """Translate ``entry`` (under ``key``, replacing what it had); ``bridge``: the
        bridge a localhost entry leads into.  False: the kernel does not serve it."""
        if self._closed:
            return False
        if self._entries.get(key) == entry:
            return self._made
        self.remove(key)
        if entry.localhost:
            if bridge is None:
                raise ValueError("a localhost entry needs its bridge")
            if bridge not in self._localnet_on and not self._set_localnet(bridge, True):
                return False
            self._bridges[key] = bridge
        self._entries[key] = entry
        change = Transaction()
        for name, elements in elements_by_map([entry]).items():
            change.add_elements("inet", self.table, name, elements)
        if self._apply(change):
            return True
        self.remove(key)
        return False

    def remove(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is None or self._closed:
            return
        change = Transaction()
        for name, elements in elements_by_map([entry]).items():
            change.delete_elements("inet", self.table, name, elements)
        self._apply(change)
        bridge = self._bridges.pop(key, None)
        if bridge is not None and bridge not in self._bridges.values():
            self._set_localnet(bridge, False)

    def serves(self, key: Hashable) -> bool:
        return self._made and key in self._entries

    # -- the table ------------------------------------------------------------------------

    def _apply(self, change: Transaction) -> bool:
        if not self._made:
            return self._render()
        try:
            self.nft.run(change)
            return True
        except HnsError as exc:
            log.debug("incremental change of %s refused (%s): rendering it whole",
                      self.table, exc)
            return self._render()

    def _render(self) -> bool:
        try:
            self.nft.run(Transaction().replace_table(
                fast_table(self.table, self._entries.values(), owner=self.owner)))
        except HnsError as exc:
            log.error("cannot make nft table %s: %s", self.table, exc)
            self._made = False
            return False
        self._made = True
        return True

    def _heal(self) -> None:
        self._timer = None
        if self._closed:
            return
        try:
            gone = self.nft.list_table("inet", self.table) is None
        except HnsError as exc:
            log.debug("cannot list nft table %s: %s", self.table, exc)
            gone = False
        if gone or not self._made:
            if gone:
                log.warning("healed nft table inet %s: it was gone", self.table)
            self._render()
        self._timer = self.engine.call_later(self.heal_interval, self._heal)

    def _set_localnet(self, bridge: str, on: bool) -> bool:
        try:
            self._localnet(bridge, on)
        except OSError as exc:
            if on:
                log.warning("cannot set route_localnet on %s: %s", bridge, exc)
                return False
            log.debug("cannot reset route_localnet on %s: %s", bridge, exc)
        if on:
            self._localnet_on.add(bridge)
        else:
            self._localnet_on.discard(bridge)
        return True
