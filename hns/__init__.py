"""hns: the Windows Host Network Service as WSL 2 uses it, emulated on Linux.

``import hns`` gives the service the CLI uses::

    with hns.Service(state_dir="/tmp/s", host_netns="myhost") as svc:
        net = svc.create_network("WSL", "nat")
        vm = svc.create_vm("wsl", "WSL")
"""

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
from hns.service import DEFAULT_STATE_DIR, Service, UpResult, open_service

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
