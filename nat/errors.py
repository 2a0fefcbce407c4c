"""The error of the nat package: nft or netfilter's netlink refused an operation.

nat imports nothing of its users; a user that has an error hierarchy of its own hands
its class to :class:`nat.nft.Nft` (``error=``), and nat raises that instead.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Callable

__all__ = ["ErrorFactory", "NatError"]


class NatError(Exception):
    """A failure, with the errno it maps to (None: unknown)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    @property
    def is_not_found(self) -> bool:
        return self.errno in (_errno.ENOENT, _errno.ENODEV, _errno.ESRCH, _errno.EADDRNOTAVAIL)

    @property
    def is_exists(self) -> bool:
        return self.errno == _errno.EEXIST


# how nat makes the exception it raises: (message, errno) -> exception
ErrorFactory = Callable[[str, int | None], Exception]
