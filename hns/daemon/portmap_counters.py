"""The kernel port mappings' counters in ``status``: packets and bytes of each mapping's
connections, both ways, read from the NAT table's counting set (``pm_count``, one
element per target; see :func:`nat.ruleset.count_set`).

Read with one ``nft -j list set`` (a few milliseconds): the kernel counts, the daemon
only reads.  The mappings come from the store on the engine thread; the read of nft
needs no engine state, so a scrape does it on its own thread.  Mappings to one VM port
share their target's counter; ``Shared`` says how many do.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from hns.errors import HnsError
from hns.naming import nft_table_name
from hns.store import MappedPort
from nat.errors import NatError
from nat.nft import Nft
from nat.ruleset import PM_COUNT, PROTOCOLS, count_key

__all__ = ["portmap_rows"]

log = logging.getLogger(__name__)


def _key(m: MappedPort) -> tuple[str, ...]:
    return count_key(m.target, PROTOCOLS[m.mapping.protocol.value],
                     m.mapping.internal_port).key


def portmap_rows(mapped: Sequence[MappedPort], nft: Nft, instance: str) -> dict[str, Any]:
    """``{"PortMappings": rows}``, one row per mapping of ``mapped`` (the store's complete
    ones), and ``PortMappingCounters`` with the error when nft could not be read."""
    if not mapped:
        return {"PortMappings": []}
    answer: dict[str, Any] = {}
    try:
        counters = nft.set_counters("inet", nft_table_name(instance), PM_COUNT) or {}
    except (HnsError, NatError) as exc:
        log.debug("port mapping counters: %s", exc)
        answer["PortMappingCounters"] = f"error: {exc}"
        counters = {}
    shared = Counter(_key(m) for m in mapped if m.running)
    rows = []
    for m in mapped:
        pm = m.mapping
        packets, moved = counters.get(_key(m), (0, 0)) if m.running else (0, 0)
        rows.append({"Vm": pm.vm, "Protocol": PROTOCOLS[pm.protocol.value],
                     "HostAddress": str(pm.host_address) if pm.host_address else None,
                     "ExternalPort": pm.external_port, "InternalPort": pm.internal_port,
                     "Target": f"{m.target}:{pm.internal_port}", "Running": m.running,
                     "Packets": packets, "Bytes": moved,
                     "Shared": shared[_key(m)] if m.running else 0})
    answer["PortMappings"] = rows
    return answer
