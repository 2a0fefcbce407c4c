"""What the data plane needs of network namespaces, as a protocol its user implements.

portproxy makes sockets inside other namespaces (dialing into a VM, reading a VM's
sockets) but does not manage namespaces: the caller hands it a :class:`Namespaces`
(hns gives :data:`hns.netns.NAMESPACES`).  A namespace is named as under
``/run/netns``; ``None`` is the caller's own.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol, TypeVar

__all__ = ["Executor", "Namespaces"]

T = TypeVar("T")


class Executor(Protocol):
    """A thread inside one namespace that runs callables there."""

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` inside and wait; its exception if it raised, OSError if the
        namespace is gone."""
        ...

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        """Run ``fn(*args)`` inside without waiting."""
        ...

    def close(self) -> None: ...


class Namespaces(Protocol):
    def executor(self, netns: str | None) -> Executor:
        """A new thread inside ``netns`` (the caller closes it)."""
        ...

    def inode(self, netns: str | None) -> tuple[int, int]:
        """(st_dev, st_ino) of ``netns``; OSError if there is none by that name."""
        ...
