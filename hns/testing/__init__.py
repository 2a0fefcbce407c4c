"""The hns pytest plugin: namespace sandboxes, NAT networks and VMs as fixtures.

Registered through the ``pytest11`` entry point, so installing hns is enough.  Importing
this module costs nothing: the kernel-touching parts load when a test asks for a fixture.

Fixtures (see docs/testing.md):

* ``hns_sandbox`` -- a fresh :class:`~hns.testing.sandbox.Sandbox` (host and outside
  namespaces, an uplink, a state directory, ``service``);
* ``nat_network`` -- a NAT network in the sandbox (an :class:`hns.Network`);
* ``nat_vm`` -- a VM on it, ready (a :class:`~hns.testing.sandbox.SandboxVm`);
* ``make_vm`` -- a factory: ``make_vm(name=None, network=None)`` returns another VM.

Tests that use them are skipped, with the reason, where root or nftables is missing.  At
the end of the session the plugin fails the run if anything a sandbox made is left.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hns.testing.sandbox import Peer, Sandbox, SandboxVm, leftovers, missing_requirements

__all__ = ["Peer", "Sandbox", "SandboxVm", "hns_sandbox", "make_vm", "nat_network", "nat_vm"]


@pytest.fixture
def hns_sandbox() -> Iterator[Sandbox]:
    """A fresh sandbox, removed after the test whatever its outcome."""
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    sandbox = Sandbox()
    try:
        yield sandbox
    finally:
        sandbox.close()


@pytest.fixture
def nat_network(hns_sandbox: Sandbox) -> Any:
    """A NAT network named ``nat`` in the sandbox, subnet chosen by hns."""
    return hns_sandbox.service.create_network("nat", "nat")


@pytest.fixture
def make_vm(hns_sandbox: Sandbox, request: pytest.FixtureRequest) -> Callable[..., SandboxVm]:
    """``make_vm(name=None, network=None, **kw)``: a new VM, on ``nat_network`` by default."""
    counter = itertools.count(1)

    def make(name: str | None = None, network: str | None = None, **kw: Any) -> SandboxVm:
        if network is None:
            network = request.getfixturevalue("nat_network").name
        return hns_sandbox.vm(name or f"vm{next(counter)}", network, **kw)

    return make


@pytest.fixture
def nat_vm(make_vm: Callable[..., SandboxVm]) -> SandboxVm:
    """A VM on ``nat_network``, addressed, routed, ready."""
    return make_vm("vm0")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    found = leftovers()
    if not found:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = "hns: sandbox objects left behind: " + ", ".join(found)
    if reporter is not None:
        reporter.write_line(message, red=True)
    else:
        print(message)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
