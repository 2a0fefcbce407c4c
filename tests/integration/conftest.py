"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers.nsutil import DaemonProc

from hns.testing import Sandbox


@pytest.fixture
def daemon(hns_sandbox: Sandbox) -> Iterator[DaemonProc]:
    d = DaemonProc(hns_sandbox)
    d.start()
    yield d
    d.kill()
