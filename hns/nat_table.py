"""The instance's NAT table (``inet hns-<tag>``): its owner in the service.

The table is derived from the state: :meth:`NatTable.sync_locked` renders it whole
(networks being created included, networks being deleted left out, port mappings being
added in) and applies it in one nft transaction; port mappings change it by elements
(:meth:`NatTable.apply_or_render`), and where nft refuses such a change the whole table
is rendered instead.  Every change of the state that a render reads, and the nft
transaction that follows it, run under the state directory's ``nft`` lock
(:meth:`NatTable.lock`), so no render falls between the two.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from hns import naming, portmap
from hns.errors import KernelError
from hns.mirrored import transit6_subnet
from hns.model import HostPort
from hns.store import LIVE, PENDING_OR_READY, Store
from nat.drift import drifted_chains
from nat.nft import NftRunner
from nat.ruleset import NatSpec, Table, nat_table
from nat.transaction import Transaction

__all__ = ["NatTable"]

log = logging.getLogger("hns")


class NatTable:
    """The NAT table of one instance: ``store`` is read, ``nft`` applies."""

    def __init__(self, store: Store, nft: NftRunner, instance: str, owner: str) -> None:
        self.store = store
        self.nft = nft
        self.instance = instance
        self.owner = owner          # the table's comment: what gc goes by
        self.name = naming.nft_table_name(instance)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The state directory's ``nft`` lock (taken after any network or VM lock)."""
        with self.store.lock("nft"):
            yield

    def sync(self) -> None:
        with self.lock():
            self.sync_locked()

    def sync_locked(self, exclude: frozenset[str] = frozenset(),
                    drop: frozenset[HostPort] = frozenset()) -> None:
        """Render the whole table from the state and apply it atomically; leave out the
        networks in ``exclude`` and the port mappings of the host ports in ``drop``."""
        table = self.render(exclude, drop)
        if table is not None:
            self.nft.run(Transaction().replace_table(table))
        else:
            self.nft.run(Transaction().destroy_table("inet", self.name))

    def render(self, exclude: frozenset[str] = frozenset(),
               drop: frozenset[HostPort] = frozenset()) -> Table | None:
        """The table the state asks for (None: no network, no table)."""
        specs = [NatSpec(n.id, n.subnet, n.bridge,
                         transit6_subnet(self.instance, n.subnet) if n.mirrored else None,
                         isolated=n.firewall or n.mirrored)
                 for n in self.store.networks(states=LIVE) if n.id not in exclude]
        if not specs:
            return None
        ids = {s.id for s in specs}
        mapped = portmap.specs(m for m in self.store.port_mappings(states=PENDING_OR_READY)
                               if m.network_id in ids and m.running
                               and m.mapping.host_port not in drop)
        return nat_table(self.name, specs, mapped, owner=self.owner)

    def drift(self) -> str | None:
        """Why the table in nft is not what the state asks for (gone, chains flushed or
        missing), or None.  Read without the lock: the healer takes it to repair."""
        want = self.render()
        if want is None:
            return None
        listing = self.nft.list_table("inet", self.name)
        if listing is None:
            return f"nft table inet {self.name} was gone"
        chains = drifted_chains(want, listing)
        if chains:
            return f"nft table inet {self.name} lost rules (chains {', '.join(chains)})"
        return None

    def apply_or_render(self, tx: Transaction, drop: frozenset[HostPort] = frozenset()) -> None:
        """Apply an incremental transaction (the caller holds the lock); where nft refuses
        it (a table made by an older version, an element that drifted), render the whole
        table from the state instead."""
        try:
            self.nft.run(tx)
        except KernelError as exc:
            log.debug("incremental nft change refused (%s); rendering the whole table", exc)
            self.sync_locked(drop=drop)
