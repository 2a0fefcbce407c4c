"""WSL's first start and its end: the network ``WSL`` and the VM ``wsl``, made and
removed through the :class:`~hns.service.Service` (``hnsctl up`` / ``down``; the daemon
that ``up`` starts beside them is :mod:`hns.daemon.spawn`'s)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hns.errors import Conflict
from hns.model import NetworkType

if TYPE_CHECKING:
    from hns.service import Service, UpResult

__all__ = ["down", "up"]


def up(svc: Service, mode: NetworkType | str, idle_timeout_ms: int | None,
       network_options: Mapping[str, Any] | None) -> UpResult:
    """The network ``WSL`` (NAT, or mirrored: WSL's ``networkingMode``; made with
    ``network_options``, ``create_network``'s keywords) and the VM ``wsl`` (reclaimed
    after ``idle_timeout_ms`` idle; None: never), started if it was stopped.  Idempotent;
    a network ``WSL`` of the other type is a conflict (``down`` first)."""
    from hns.service import DEFAULT_NETWORK, DEFAULT_VM, UpResult
    want = mode if isinstance(mode, NetworkType) else NetworkType.parse(mode)
    net = svc.store.find_network(DEFAULT_NETWORK)
    if net is not None and net.type is not want:
        raise Conflict(f"network {DEFAULT_NETWORK} is {net.type.value.lower()}, not "
                       f"{want.value.lower()}: run 'hnsctl down' first")
    svc.restore()
    created = False
    if net is None:
        net = svc.create_network(DEFAULT_NETWORK, want, **(network_options or {}))
        created = True
    if svc.store.find_vm(DEFAULT_VM) is None:
        svc.create_vm(DEFAULT_VM, DEFAULT_NETWORK, idle_timeout_ms=idle_timeout_ms)
        created = True
    else:
        svc.set_idle_timeout(DEFAULT_VM, idle_timeout_ms)
        created |= svc.start_vm(DEFAULT_VM)
    svc.port_maps.readd_remembered(DEFAULT_VM)
    return UpResult(net, svc.get_vm(DEFAULT_VM), created)


def down(svc: Service) -> list[str]:
    """Remove ``wsl`` and ``WSL`` (and VMs attached to it); what was removed.  The subnet
    stays remembered, and so do the port mappings of the VMs removed (by VM name; ``up``
    re-adds ``wsl``'s)."""
    from hns.service import DEFAULT_NETWORK, DEFAULT_VM
    net = svc.store.find_network(DEFAULT_NETWORK)
    names = [DEFAULT_VM, *(v.name for v in svc.store.vms(net.id))] if net else [DEFAULT_VM]
    removed = [f"vm {name}" for name in dict.fromkeys(names)
               if svc.delete_vm(name, remember=True)]
    if svc.delete_network(DEFAULT_NETWORK, force=True):
        removed.append(f"network {DEFAULT_NETWORK}")
    return removed
