"""The plugin's fixtures (docs/testing.md has an example of each).

Layered like pyroute2's: ``hns_sandbox`` -> ``nat_network`` -> ``nat_vm``/``make_vm``;
``mirrored_network`` -> ``mirrored_vm``; ``hns_daemon`` -> ``portproxy``;
``port_mapping``.  Every fixture removes what it made, tolerating objects already gone,
unless ``--hns-keep-on-failure`` keeps a failed test's sandbox as it was (the daemon
and the processes the test started stop all the same).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hns.testing import plugin
from hns.testing.daemon import HnsDaemon
from hns.testing.sandbox import Sandbox, SandboxVm, missing_requirements
from hns.testing.wait import wait_until

__all__ = [
    "hns_daemon",
    "hns_sandbox",
    "hns_session_sandbox",
    "make_vm",
    "mirrored_network",
    "mirrored_vm",
    "nat_network",
    "nat_vm",
    "port_mapping",
    "portproxy",
]


def _new_sandbox(request: pytest.FixtureRequest) -> Sandbox:
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    sandbox = Sandbox()
    plugin.adopt(request, sandbox)
    return sandbox


@pytest.fixture
def hns_sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """A fresh sandbox, removed after the test whatever its outcome (kept instead with
    ``--hns-keep-on-failure`` when the test failed)."""
    sandbox = _new_sandbox(request)
    try:
        yield sandbox
    finally:
        if plugin.keeping(request):
            plugin.keep_sandbox(request.config, sandbox)
        else:
            sandbox.close()


@pytest.fixture(scope="session")
def hns_session_sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """One sandbox for the whole session (for the tests of a process that are slow to
    set up); what a test makes in it stays for the next tests.  Removed at the end of
    the session, or kept there if a test that used it failed under
    ``--hns-keep-on-failure``."""
    sandbox = _new_sandbox(request)
    try:
        yield sandbox
    finally:
        if plugin.settings(request.config).session_failed:
            plugin.keep_sandbox(request.config, sandbox)
        else:
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


@pytest.fixture
def mirrored_network(hns_sandbox: Sandbox) -> Any:
    """A mirrored network named ``mirrored``: its VMs wear the host's addresses."""
    return hns_sandbox.service.create_network("mirrored", "mirrored")


@pytest.fixture
def mirrored_vm(make_vm: Callable[..., SandboxVm], mirrored_network: Any) -> SandboxVm:
    """A VM named ``mvm0`` on ``mirrored_network``."""
    return make_vm("mvm0", network=mirrored_network.name)


@pytest.fixture
def hns_daemon(hns_sandbox: Sandbox) -> Iterator[HnsDaemon]:
    """``hnsctl daemon`` for the sandbox, answering ``status``; SIGTERM at teardown."""
    daemon = HnsDaemon(hns_sandbox)
    try:
        yield daemon.start()
    finally:
        daemon.stop()


@pytest.fixture
def port_mapping(hns_sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[
        Callable[..., Any]]:
    """``port_mapping(vm, external_port, internal_port=None, protocol="tcp",
    host_address=None)``: a WSL port mapping through the service (an ``hns.PortMapping``);
    ``vm`` a :class:`SandboxVm` or a VM name.  Deleted at teardown."""
    made: list[Any] = []

    def add(vm: SandboxVm | str, external_port: int, internal_port: int | None = None,
            protocol: str = "tcp", host_address: str | None = None) -> Any:
        name = vm if isinstance(vm, str) else vm.name
        mapping = hns_sandbox.service.add_port_mapping(
            name, protocol, external_port,
            external_port if internal_port is None else internal_port, host_address)
        made.append(mapping)
        return mapping

    yield add
    if plugin.keeping(request) or hns_sandbox.kept:
        return
    for m in reversed(made):
        with contextlib.suppress(Exception):     # the VM (and so the mapping) may be gone
            hns_sandbox.service.delete_port_mapping(m.vm, m.protocol, m.external_port,
                                                    m.host_address)


def _relay_rows(daemon: HnsDaemon, protocol: str, port: int) -> list[dict[str, Any]]:
    return [r for r in daemon.status().get("Relays", [])
            if r.get("Kind") == "portproxy" and r.get("Protocol") == protocol
            and str(r.get("Listen", "")).endswith(f":{port}")]


@pytest.fixture
def portproxy(hns_sandbox: Sandbox, hns_daemon: HnsDaemon, request: pytest.FixtureRequest
              ) -> Iterator[Callable[..., dict[str, Any]]]:
    """``portproxy(listenport, connectaddress, connectport=None, *, listenaddress=None,
    protocol="tcp", kind="v4tov4", timeout=10.0)``: a static port proxy in netsh's words
    (``hnsctl portproxy add``), served by ``hns_daemon``; returns its relay's status
    once it listens.  ``connectaddress`` a :class:`SandboxVm` or an address.  Deleted at
    teardown."""
    made: list[tuple[str, list[str]]] = []

    def add(listenport: int, connectaddress: SandboxVm | str, connectport: int | None = None,
            *, listenaddress: str | None = None, protocol: str = "tcp", kind: str = "v4tov4",
            timeout: float = 10.0) -> dict[str, Any]:
        connect = connectaddress if isinstance(connectaddress, str) else connectaddress.ip
        key = [f"listenport={listenport}", f"protocol={protocol}"]
        if listenaddress is not None:
            key.append(f"listenaddress={listenaddress}")
        words = [*key, f"connectaddress={connect}"]
        if connectport is not None:
            words.append(f"connectport={connectport}")
        result = hns_sandbox.hnsctl("portproxy", "add", kind, *words)
        if result.returncode != 0:
            raise RuntimeError(f"hnsctl portproxy add {kind} {' '.join(words)}: "
                               f"{result.stderr.strip()}")
        made.append((kind, key))

        def listening() -> list[dict[str, Any]]:
            rows = _relay_rows(hns_daemon, protocol, listenport)
            return rows if rows and all(r["State"] == "listening" for r in rows) else []

        return wait_until(listening, timeout=timeout,
                          what=f"the proxy on port {listenport}/{protocol} to listen")[0]

    yield add
    if plugin.keeping(request) or hns_sandbox.kept:
        return
    for kind, key in reversed(made):
        hns_sandbox.hnsctl("portproxy", "delete", kind, *key)
