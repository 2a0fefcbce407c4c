"""The error hierarchy of hns.

Every failure the service reports is an :class:`HnsError`.  Two families matter to
callers: errors in the request itself (the CLI exits 2 and nothing was changed), and
runtime failures (the CLI exits 1 and whatever was made half way has been removed).
Kernel and nft errors are translated at the boundary into :class:`KernelError`.
"""

from __future__ import annotations

from nat.errors import NatError

__all__ = [
    "AlreadyExists",
    "Conflict",
    "HnsError",
    "InvalidRequest",
    "KernelError",
    "NotFound",
    "StateError",
]


class HnsError(Exception):
    """Base class.  ``exit_code`` is what the CLI returns for it."""

    exit_code = 1


class InvalidRequest(HnsError):
    """The request is malformed: a bad name, address, CIDR, MAC, MTU or option."""

    exit_code = 2


class NotFound(InvalidRequest):
    """The request names an object that does not exist."""


class AlreadyExists(InvalidRequest):
    """The request would create an object whose name or address is taken."""


class Conflict(InvalidRequest):
    """The request contradicts the current state (overlapping subnet, VMs attached)."""


class KernelError(HnsError, NatError):
    """The kernel (netlink, nft, mount) refused an operation: ``errno``, ``is_not_found``
    and ``is_exists`` as nat's error has them (hns hands this class to nat to raise)."""


class StateError(HnsError):
    """The state store cannot be opened or is inconsistent."""


class ClusterError(HnsError):
    """etcd could not be reached or refused the request (exit 1)."""

