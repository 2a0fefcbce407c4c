"""``hnsctl daemon`` for one sandbox, run by a test as a child process.

The daemon runs in a session of its own (a Ctrl-C on the terminal reaches pytest, which
then stops it in order), with ``PR_SET_PDEATHSIG`` set through ``setpriv`` where that
exists (a SIGKILLed pytest takes its daemon along), and writes its log to
``<state dir>/hns_daemon.log`` (a pipe nobody read would block a chatty daemon; a
kept sandbox keeps the log).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from typing import Any

from hns.testing.wait import wait_until

__all__ = ["LOG_NAME", "HnsDaemon"]

LOG_NAME = "hns_daemon.log"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class HnsDaemon:
    """``hnsctl daemon`` serving ``sandbox``: :meth:`start`, :meth:`status`,
    :meth:`relay`, :meth:`stop` (SIGTERM), :meth:`kill`; ``proc`` is the ``Popen``."""

    def __init__(self, sandbox: Any, *args: str, output: str = "log") -> None:
        """``args``: more words for ``hnsctl daemon`` (``--no-heal``); ``output``:
        ``"log"`` (the log file) or ``"pipe"`` (stdout and stderr pipes of ``proc``, text,
        for a test that reads them with ``proc.communicate()`` after stopping it)."""
        if output not in ("log", "pipe"):
            raise ValueError(f"output {output!r}: use 'log' or 'pipe'")
        self.sandbox = sandbox
        self.args = args
        self.output = output
        self.proc: subprocess.Popen[str] | None = None
        self.stdout: str | None = None          # "pipe": what it wrote, once it ended
        self.stderr: str | None = None
        self.log_path = os.path.join(sandbox.state_dir, LOG_NAME)

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc is not None else None
        return f"HnsDaemon(sandbox={self.sandbox.tag!r}, pid={pid}, running={self.running})"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        argv = [*self.sandbox.hnsctl_argv(), "daemon", *self.args]
        setpriv = shutil.which("setpriv")
        return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv

    def start(self, timeout: float = START_TIMEOUT) -> HnsDaemon:
        """Start it and wait until ``hnsctl --json status`` answers Running."""
        if self.running:
            return self
        if self.output == "pipe":
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, start_new_session=True)
        else:
            with open(self.log_path, "a") as log:
                self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT, text=True,
                                             start_new_session=True)
        try:
            wait_until(self._answering, timeout=timeout,
                       what=f"the daemon of {self.sandbox.host_netns} to answer")
        except BaseException:
            self.kill()
            raise
        return self

    def _answering(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            err = self.proc.communicate()[1] if self.output == "pipe" else self.log_tail(5)
            raise RuntimeError(f"the daemon exited ({self.proc.returncode}): {err}")
        result = self.sandbox.hnsctl("--json", "status")
        if result.returncode != 0:
            return False
        with contextlib.suppress(ValueError):
            return json.loads(result.stdout).get("Running") is True
        return False

    def status(self) -> dict[str, Any]:
        """``hnsctl --json status`` as a dict (RuntimeError if the command fails)."""
        result = self.sandbox.hnsctl("--json", "status")
        if result.returncode != 0:
            raise RuntimeError(f"hnsctl status: {result.stderr.strip()}")
        return dict(json.loads(result.stdout))

    def relay(self, name_part: str) -> dict[str, Any]:
        """The status of the relay whose name contains ``name_part`` (LookupError)."""
        relays = self.status().get("Relays", [])
        for relay in relays:
            if name_part in relay["Name"]:
                return dict(relay)
        raise LookupError(f"no relay {name_part!r} among {[r['Name'] for r in relays]}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then wait (SIGKILL after ``timeout``); the exit code, None if it was
        never started.  Safe to call twice."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self._wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def _wait(self, timeout: float | None) -> None:
        assert self.proc is not None
        if self.output == "pipe" and self.proc.stdout and not self.proc.stdout.closed:
            self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        else:
            self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL, no questions asked."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self._wait(None)

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the daemon's log."""
        if self.output == "pipe":
            return "(the daemon's output goes to its pipes)"
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:]).rstrip("\n")
        except OSError as exc:
            return f"(no log: {exc})"
