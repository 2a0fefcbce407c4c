"""The one place where hns starts other programs.  Always an argv list, never a shell.

``netns`` runs the program inside a named network namespace through ``nsenter``, which
changes only the network namespace (``ip netns exec`` would also remount /sys).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

from hns.netns import netns_path

__all__ = ["exec_in_netns", "run"]


def _in_netns(argv: Sequence[str], netns: str | None) -> list[str]:
    if not netns:
        return list(argv)
    return ["nsenter", f"--net={netns_path(netns)}", "--", *argv]


def run(argv: Sequence[str], *, input: str | None = None, netns: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run to completion, capturing output; never raises for a non-zero exit."""
    try:
        return subprocess.run(_in_netns(argv, netns), input=input, capture_output=True,
                              text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        return subprocess.CompletedProcess(list(argv), 127, "", f"{exc.filename}: not found")


def exec_in_netns(netns: str, argv: Sequence[str]) -> None:
    """Replace this process with ``argv`` inside the VM namespace ``netns``.

    ``ip netns exec`` is used because it also bind-mounts ``/etc/netns/<netns>/`` over
    ``/etc`` (the VM's resolv.conf) in a private mount namespace.
    """
    os.execvp("ip", ["ip", "netns", "exec", netns, *argv])
