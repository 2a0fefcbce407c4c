"""Unit tests never touch the kernel: a guard that turns any attempt into a failure.

The unit suite runs as root in CI; without this, a test that reached the real kernel
driver would change the machine's own network namespace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from socket import socket
from typing import NoReturn

import pytest
from helpers.relay import Server


def _refuse(*args: object, **kwargs: object) -> NoReturn:
    raise AssertionError("a unit test reached the kernel (netlink, a namespace or nft)")


@pytest.fixture(autouse=True)
def _no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("hns.kernel.HostKernel.__init__", _refuse)
    monkeypatch.setattr("hns.kernel.configure_vm_side", _refuse)
    monkeypatch.setattr("hns.netns.create_netns", _refuse)
    monkeypatch.setattr("hns.netns.NetnsExecutor.__init__", _refuse)
    monkeypatch.setattr("hns.process.run", _refuse)


@pytest.fixture(autouse=True)
def _no_tag_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new state dir asks the host (namespaces, nft) which instance tags are taken:
    not in unit tests (a fixture of its own: test modules override ``_no_kernel``)."""
    monkeypatch.setattr("hns.service.Service._tag_taken", lambda self, tag: False)


@pytest.fixture
def servers() -> Iterator[Callable[[Callable[[socket], None]], Server]]:
    """Loopback TCP servers (:class:`helpers.relay.Server`), closed after the test."""
    made: list[Server] = []

    def make(handler: Callable[[socket], None]) -> Server:
        made.append(Server(handler))
        return made[-1]

    yield make
    for server in made:
        server.close()
