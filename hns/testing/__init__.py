"""The hns pytest plugin: namespace sandboxes, NAT and mirrored networks, VMs, the daemon,
port mappings and port proxies as fixtures.

Registered through the ``pytest11`` entry point, so installing hns is enough.  Importing
this module costs little: the kernel-touching parts load when a test asks for a fixture.

Fixtures (:mod:`hns.testing.fixtures`, docs/testing.md): ``hns_sandbox``,
``hns_session_sandbox``, ``nat_network``, ``nat_vm``, ``make_vm``, ``mirrored_network``,
``mirrored_vm``, ``hns_daemon``, ``port_mapping``, ``portproxy``.  Helpers:
:func:`wait_until`, :func:`wait_port`.  Options (:mod:`hns.testing.plugin`):
``--hns-prefix``, ``--hns-keep-on-failure``, ``--hns-capture``.

Tests that use the fixtures are skipped, with the reason, where root or nftables is
missing.  A failing test's report carries an ``hns diagnostics`` section.  At the end of
the session the plugin fails the run if anything a sandbox made is left; at its start it
removes the sandboxes of runs that died (:func:`remove_stale_sandboxes`).
"""

from __future__ import annotations

import importlib.util

from hns.testing.daemon import HnsDaemon
from hns.testing.sandbox import (
    Peer,
    Sandbox,
    SandboxVm,
    leftovers,
    missing_requirements,
    remove_stale_sandboxes,
)
from hns.testing.wait import wait_port, wait_until

if importlib.util.find_spec("pytest") is not None:   # the plugin; Sandbox needs no pytest
    from hns.testing.fixtures import (
        hns_daemon,
        hns_sandbox,
        hns_session_sandbox,
        make_vm,
        mirrored_network,
        mirrored_vm,
        nat_network,
        nat_vm,
        port_mapping,
        portproxy,
    )
    from hns.testing.plugin import (
        pytest_addoption,
        pytest_configure,
        pytest_report_header,
        pytest_runtest_call,
        pytest_runtest_makereport,
        pytest_runtest_protocol,
        pytest_runtest_teardown,
        pytest_sessionfinish,
        pytest_sessionstart,
        pytest_terminal_summary,
    )


__all__ = [
    "HnsDaemon",
    "Peer",
    "Sandbox",
    "SandboxVm",
    "hns_daemon",
    "hns_sandbox",
    "hns_session_sandbox",
    "leftovers",
    "make_vm",
    "mirrored_network",
    "mirrored_vm",
    "missing_requirements",
    "nat_network",
    "nat_vm",
    "port_mapping",
    "portproxy",
    "pytest_addoption",
    "pytest_configure",
    "pytest_report_header",
    "pytest_runtest_call",
    "pytest_runtest_makereport",
    "pytest_runtest_protocol",
    "pytest_runtest_teardown",
    "pytest_sessionfinish",
    "pytest_sessionstart",
    "pytest_terminal_summary",
    "remove_stale_sandboxes",
    "wait_port",
    "wait_until",
]
