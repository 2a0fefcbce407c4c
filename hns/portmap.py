"""Port mappings (HNS's ``PortMapping`` endpoint policy): checks and conversions the
service uses.

Theory of operation (the service does the steps, under the state directory's ``nft``
lock so that no full render of the NAT table runs between a state change and its nft
transaction):

* add: validate (pure) -> one store transaction (the VMs exist, no host port is taken
  twice; a trigger in the store enforces the latter too) -> one nft transaction of
  ``add element``\\ s -> if nft refuses (a table made by an older version, an element
  left behind with another target), the whole table is rendered from the state instead
  -> if that fails too, the rows are removed again and the error is reported.
* delete: ``delete element`` (or, if nft refuses, the full render without the mapping),
  then the row: kernel first, so a failed delete can be run again.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address

from hns.errors import Conflict
from hns.model import HostPort, PortMapping, Vm
from hns.store import MappedPort, Store
from nat.ruleset import PortMapSpec

__all__ = ["check_batch", "check_free", "conflict_message", "spec", "specs",
           "with_policies"]


def conflict_message(new: HostPort, taken: MappedPort) -> str:
    return (f"host port {new.describe()} is already mapped: "
            f"{taken.mapping.describe()}")


def check_batch(batch: Sequence[PortMapping]) -> None:
    """No two mappings of one request take the same host port (pure)."""
    seen: dict[tuple[object, int], list[PortMapping]] = {}
    for m in batch:
        for other in seen.get((m.protocol, m.external_port), []):
            if m.host_port.overlaps(other.host_port):
                raise Conflict(f"host port {m.host_port.describe()} is mapped twice in "
                               f"one request ({other.describe()}, {m.describe()})")
        seen.setdefault((m.protocol, m.external_port), []).append(m)


def check_free(store: Store, batch: Sequence[PortMapping]) -> dict[str, Vm]:
    """Inside a write transaction of ``store``: every VM exists and every host port is
    free.  Returns the VMs by name."""
    vms = {name: store.vm(name) for name in dict.fromkeys(m.vm for m in batch)}
    for m in batch:
        taken = store.port_mapping_conflict(m.host_port)
        if taken is not None:
            raise Conflict(conflict_message(m.host_port, taken))
    return vms


def spec(mapping: PortMapping, target: IPv4Address) -> PortMapSpec:
    """The nft view of a mapping: typed values only."""
    return PortMapSpec(protocol=mapping.protocol.value, external_port=mapping.external_port,
                       target=target, internal_port=mapping.internal_port,
                       host_address=mapping.host_address)


def specs(mapped: Iterable[MappedPort]) -> list[PortMapSpec]:
    return [spec(m.mapping, m.target) for m in mapped]


def with_policies(vms: list[Vm], mapped: Iterable[MappedPort]) -> list[Vm]:
    """The VMs with their port mappings as HNS endpoint policies."""
    policies: dict[str, list[dict[str, object]]] = defaultdict(list)
    for m in mapped:
        policies[m.mapping.vm].append(m.mapping.to_policy())
    return [dataclasses.replace(vm, policies=tuple(policies[vm.name])) for vm in vms]
