"""Packet captures of a test's VMs (``--hns-capture``).

One :class:`Captures` per test: a recorder (:class:`hns.capture.Recorder`, imported
when the first capture starts) on the host-side interface of each VM, from the moment
the VM is made through the sandbox (or, for a VM made before the test, from the start
of the test's call) until the test's outcome is known.  The pcap files are then kept
(``always``; ``on-failure`` and the test failed) or deleted.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

from hns.testing.report import CaptureFile, error_line

__all__ = ["MODES", "Captures", "pcap_name"]

MODES = ("never", "on-failure", "always")


def pcap_name(nodeid: str, sandbox_tag: str, vm: str) -> str:
    """A file name for one VM's capture in one test: readable, no path separators."""
    test = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid.split("::", 1)[-1]).strip("_")[:80]
    return f"{test or 'test'}-{sandbox_tag}-{vm}.pcap"


class Captures:
    """The recorders of one test."""

    def __init__(self, directory: Path, nodeid: str) -> None:
        self.directory = directory
        self.nodeid = nodeid
        self.files: list[CaptureFile] = []
        self._running: list[tuple[int, Any]] = []        # (index in files, recorder)
        self._seen: set[tuple[int, str]] = set()
        self.stopped = False
        self.finished = False

    def add(self, sandbox: Any, vm: Any) -> None:
        """Start capturing ``vm`` of ``sandbox`` (once per VM; never raises: an error
        becomes the file's ``error``)."""
        key = (id(sandbox), vm.name)
        if self.stopped or key in self._seen:
            return
        self._seen.add(key)
        path = self.directory / pcap_name(self.nodeid, sandbox.tag, vm.name)
        try:
            from hns.capture import Recorder
            recorder = Recorder(sandbox.host_netns, vm.info.host_ifname, str(path))
            recorder.start()
        except Exception as exc:
            self.files.append(CaptureFile(vm.name, str(path),
                                          error=error_line("hns.capture", exc)))
            return
        self.files.append(CaptureFile(vm.name, str(path)))
        self._running.append((len(self.files) - 1, recorder))

    def stop(self) -> None:
        """Stop every recorder; safe to call twice."""
        self.stopped = True
        running, self._running = self._running, []
        for index, recorder in running:
            old = self.files[index]
            try:
                packets: int | None = int(recorder.stop())
                error = None
            except Exception as exc:
                packets, error = None, error_line("stopping the capture", exc)
            self.files[index] = CaptureFile(old.vm, old.path, packets, error)

    def finish(self, keep: bool) -> list[CaptureFile]:
        """Stop, then keep or delete the files; the files."""
        self.stop()
        if not self.finished and not keep:
            for f in self.files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f.path)
        self.finished = True
        return self.files
