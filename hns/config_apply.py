"""The settings file put to work: what ``up`` makes from it, and what ``hnsctl reload``
and the daemon's SIGHUP change live (docs/settings.md, docs/service.md).

The settings last applied are kept in ``<state-dir>/settings.applied.json`` (their
values), so a reload knows what changed: the live keys are applied -- the network
``WSL``'s localhost forwarding, ignored ports and host-address loopback (in the state:
the daemon follows), the VM ``wsl``'s idle timeout, the daemon's relay limits for the
relays it starts from then on -- and the others are named as needing ``hnsctl down``
and ``up``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hns import settings as hs

if TYPE_CHECKING:
    from hns.service import Service

__all__ = ["APPLIED_FILE", "applied", "network_options", "read", "record", "reload"]

APPLIED_FILE = "settings.applied.json"


def read(path_option: str | None, flags: Mapping[str, object] | None = None) -> hs.Settings:
    """The settings of ``--config`` / ``HNS_CONFIG`` / the default file, ``flags`` over
    them."""
    path, explicit = hs.resolve_path(path_option, os.environ)
    return hs.load(path, explicit=explicit, flags=flags or {})


def network_options(s: hs.Settings) -> dict[str, Any]:
    """``create_network``'s keywords for the network ``WSL``."""
    options: dict[str, Any] = {"localhost_forwarding": s.localhost_forwarding,
                               "firewall": s.firewall, "dns_proxy": s.dns_proxy,
                               "subnet": s.subnet}
    if s.networking_mode == "mirrored":
        options.update(ignored_ports=s.ignored_ports,
                       host_address_loopback=s.host_address_loopback,
                       subnet=None, firewall=True, localhost_forwarding=True)
    return options


def idle_timeout(s: hs.Settings) -> int | None:
    return None if s.vm_idle_timeout_ms < 0 else s.vm_idle_timeout_ms


def record(state_dir: str | os.PathLike[str], s: hs.Settings) -> None:
    values = {name: v["Value"] for name, v in s.to_json().items()}
    path = Path(state_dir) / APPLIED_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values, indent=2) + "\n")
    os.replace(tmp, path)


def applied(state_dir: str | os.PathLike[str]) -> hs.Settings | None:
    """The settings last applied to ``state_dir``, None if none were."""
    with contextlib.suppress(OSError, ValueError):
        values = json.loads((Path(state_dir) / APPLIED_FILE).read_text())
        return hs.loads("", flags={k: v for k, v in values.items() if v is not None})
    return None


def reload(svc: Service, s: hs.Settings) -> tuple[list[str], list[str]]:
    """Apply the live keys of ``s`` to the state; (live keys changed, keys that need
    ``down``/``up``).  Records ``s`` as applied."""
    from hns.service import DEFAULT_NETWORK, DEFAULT_VM
    old = applied(svc.store.state_dir) or hs.defaults()
    live, restart = hs.changes(old, s)
    net = svc.store.find_network(DEFAULT_NETWORK)
    if net is not None and {"localhostForwarding", "ignoredPorts",
                            "hostAddressLoopback"} & set(live):
        svc.set_network_options(DEFAULT_NETWORK, **_live_network(net.mirrored, s))
    if "vmIdleTimeout" in live and svc.store.find_vm(DEFAULT_VM) is not None:
        svc.set_idle_timeout(DEFAULT_VM, idle_timeout(s))
    record(svc.store.state_dir, s)
    svc.poke_daemon()
    return live, restart


def _live_network(mirrored: bool, s: hs.Settings) -> dict[str, Any]:
    if mirrored:
        return {"ignored_ports": s.ignored_ports,
                "host_address_loopback": s.host_address_loopback}
    return {"localhost_forwarding": s.localhost_forwarding}
