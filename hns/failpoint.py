"""Failpoints: named steps where a test can make the process die (etcd's gofail, in small).

``HNS_FAILPOINT`` holds a comma-separated list of names such as ``vm-create:after-netns``;
:func:`failpoint` reads it only when a named step is reached, and when the step is
listed the process SIGKILLs itself there: no cleanup, no ``finally``, exactly what a
power cut or an OOM kill leaves.  Unset (always, outside tests) a failpoint costs one
environment lookup.

The names are a contract of the crash tests (:data:`POINTS`): every one is walked by
``tests/integration/test_crash.py``.
"""

from __future__ import annotations

import os
import signal

__all__ = ["ENV", "POINTS", "failpoint"]

ENV = "HNS_FAILPOINT"

POINTS: dict[str, tuple[str, ...]] = {
    "network-create": ("after-store", "after-bridge", "after-nft"),
    "network-delete": ("after-mark", "after-nft", "after-bridge"),
    "vm-create": ("after-store", "after-netns", "after-veth", "after-config"),
    "vm-delete": ("after-mark", "after-nft", "after-kernel"),
    "portmap-add": ("after-store", "after-nft"),
    "portmap-delete": ("after-mark", "after-nft"),
}


def failpoint(name: str) -> None:
    """Die here (SIGKILL) if ``name`` is listed in ``HNS_FAILPOINT``."""
    wanted = os.environ.get(ENV)
    if wanted and name in wanted.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
