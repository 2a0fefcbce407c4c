"""hns: the Windows Host Network Service as WSL 2 uses it, emulated on Linux.

``import hns`` gives the service the CLI uses::

    with hns.Service(state_dir="/tmp/s", host_netns="myhost") as svc:
        net = svc.create_network("WSL", "nat")
        vm = svc.create_vm("wsl", "WSL")
"""

from typing import TYPE_CHECKING

from hns.errors import (
    AlreadyExists,
    Conflict,
    HnsError,
    InvalidRequest,
    KernelError,
    NotFound,
    StateError,
)
from hns.model import Network, NetworkType, Vm

if TYPE_CHECKING:
    from hns.service import DEFAULT_STATE_DIR, Service, UpResult, open_service

_SERVICE_NAMES = ("DEFAULT_STATE_DIR", "Service", "UpResult", "open_service")


def __getattr__(name: str) -> object:
    # hns.service (and through it nat) loads on first use, so that ``nat`` can use
    # ``hns.errors`` and ``hns.process`` without an import cycle.
    if name in _SERVICE_NAMES:
        from hns import service
        return getattr(service, name)
    raise AttributeError(f"module 'hns' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_STATE_DIR",
    "AlreadyExists",
    "Conflict",
    "HnsError",
    "InvalidRequest",
    "KernelError",
    "Network",
    "NetworkType",
    "NotFound",
    "Service",
    "StateError",
    "UpResult",
    "Vm",
    "open_service",
]
