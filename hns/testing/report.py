"""The texts the plugin adds to a test report (pure: values in, text out).

* ``hns diagnostics``: per VM the text of :func:`hns.diag.diagnose`, the daemon's status,
  the host namespace's nft ruleset (:func:`diagnostics_text`);
* ``hns sandbox kept``: how to enter a sandbox kept by ``--hns-keep-on-failure``
  (:func:`kept_text`);
* ``hns capture``: the pcap files of the test (:func:`capture_text`).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "CaptureFile",
    "KeptSandbox",
    "Part",
    "capture_text",
    "diagnostics_text",
    "error_line",
    "kept_text",
]

RULE = "-" * 8


@dataclass(frozen=True)
class Part:
    """One titled part of the diagnostics: ``title`` and its text."""

    title: str
    text: str


def error_line(what: str, exc: BaseException) -> str:
    """One line for a diagnostic that could not be had: ``what: Type: message``."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{what}: {type(exc).__name__}" + (f": {message}" if message else "")


def diagnostics_text(sandbox_name: str, parts: Sequence[Part]) -> str:
    """The section text for one sandbox: each part under a ``-------- title`` line."""
    out = [f"sandbox {sandbox_name}"]
    for part in parts:
        out.append(f"{RULE} {part.title}")
        body = part.text.rstrip("\n")
        out.append(body if body else "(empty)")
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class KeptSandbox:
    """What a person needs to look at a kept sandbox."""

    host_netns: str
    outside_netns: str
    state_dir: str
    vm_netns: tuple[str, ...] = ()
    python: str = sys.executable


def kept_text(kept: KeptSandbox) -> str:
    """How to enter a kept sandbox, read its state and remove it."""
    hnsctl = (f"{shlex.quote(kept.python)} -m hns.cli --state-dir "
              f"{shlex.quote(kept.state_dir)} --host-netns {shlex.quote(kept.host_netns)}")
    lines = [
        f"sandbox kept: host netns {kept.host_netns}, outside netns {kept.outside_netns}",
        f"  state dir: {kept.state_dir}",
        f"  enter the host:    ip netns exec {kept.host_netns} bash",
        f"  enter the outside: ip netns exec {kept.outside_netns} bash",
    ]
    lines += [f"  enter a VM:        ip netns exec {ns} bash" for ns in kept.vm_netns]
    lines += [
        f"  its state:         hnsctl --state-dir {kept.state_dir} "
        f"--host-netns {kept.host_netns} status",
        f"                     (without hnsctl on PATH: {hnsctl} status)",
        "  remove it:         hnsctl gc --sandboxes   (once this run has ended)",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class CaptureFile:
    """One VM's capture: the VM, the pcap path, its packet count or the error."""

    vm: str
    path: str
    packets: int | None = None
    error: str | None = None


def capture_text(files: Sequence[CaptureFile], kept: bool) -> str:
    """The pcap files of a test: where they are (or that they were deleted)."""
    lines = []
    for f in files:
        if f.error is not None:
            lines.append(f"vm {f.vm}: no capture ({f.error})")
        elif kept:
            count = f" ({f.packets} packets)" if f.packets is not None else ""
            lines.append(f"vm {f.vm}: {f.path}{count}   read it: tcpdump -nr {f.path}")
        else:
            lines.append(f"vm {f.vm}: deleted")
    return "\n".join(lines) + ("\n" if lines else "")
