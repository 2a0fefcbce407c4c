"""What a host knows of the cluster, and the kernel entries that follow from it.

Pure: the agent feeds :class:`ClusterView` the listed records and then each watched
event; :func:`entries_for` says which static entries a host's VXLAN device of a network
must have (the other hosts' endpoints), and :func:`diff` what to add and remove to get
there from what the kernel has.  Applying a diff twice changes nothing, so a resync
after a restart or a lost watch neither duplicates nor loses an entry.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from hns.cluster.etcd import Event, KeyValue
from hns.cluster.records import (
    EndpointRecord,
    HostRecord,
    NetworkRecord,
    Record,
    parse_record,
)

__all__ = ["ClusterView", "Entries", "Plan", "diff", "entries_for"]

Fdb = tuple[str, IPv4Address]          # remote VM MAC -> its host's VTEP
Neigh = tuple[IPv4Address, str]        # remote VM IP -> its MAC


@dataclass(frozen=True)
class Entries:
    """The static entries of one VXLAN device."""

    fdb: frozenset[Fdb] = frozenset()
    neigh: frozenset[Neigh] = frozenset()

    @property
    def count(self) -> int:
        return len(self.fdb) + len(self.neigh)


@dataclass(frozen=True)
class Plan:
    add_fdb: frozenset[Fdb] = frozenset()
    remove_fdb: frozenset[Fdb] = frozenset()
    add_neigh: frozenset[Neigh] = frozenset()
    remove_neigh: frozenset[Neigh] = frozenset()

    @property
    def empty(self) -> bool:
        return not (self.add_fdb or self.remove_fdb or self.add_neigh or self.remove_neigh)


@dataclass
class ClusterView:
    """The records under the cluster prefix, by key, as of ``revision``."""

    records: dict[str, Record] = field(default_factory=dict)
    revision: int = 0

    @classmethod
    def listed(cls, kvs: Iterable[KeyValue], revision: int) -> ClusterView:
        view = cls(revision=revision)
        for kv in kvs:
            view._put(kv)
        return view

    def _put(self, kv: KeyValue) -> None:
        record = parse_record(kv.key, kv.value)
        if record is None:
            self.records.pop(kv.key, None)
        else:
            self.records[kv.key] = record

    def apply(self, event: Event) -> None:
        if event.deleted:
            self.records.pop(event.kv.key, None)
        else:
            self._put(event.kv)
        self.revision = max(self.revision, event.kv.mod_revision)

    def networks(self) -> dict[str, NetworkRecord]:
        return {r.name: r for r in self.records.values() if isinstance(r, NetworkRecord)}

    def hosts(self) -> dict[str, HostRecord]:
        return {r.name: r for r in self.records.values() if isinstance(r, HostRecord)}

    def endpoints(self, network: str | None = None) -> list[EndpointRecord]:
        return sorted((r for r in self.records.values() if isinstance(r, EndpointRecord)
                       and (network is None or r.network == network)),
                      key=lambda r: (r.network, r.ip))


def entries_for(view: ClusterView, network: str, host: str) -> Entries:
    """The entries ``host``'s device of ``network`` must have: one FDB and one
    neighbour entry per endpoint of another host."""
    remote = [e for e in view.endpoints(network) if e.host != host]
    return Entries(frozenset((e.mac, e.vtep) for e in remote),
                   frozenset((e.ip, e.mac) for e in remote))


def diff(have: Entries, want: Entries) -> Plan:
    return Plan(want.fdb - have.fdb, have.fdb - want.fdb,
                want.neigh - have.neigh, have.neigh - want.neigh)
