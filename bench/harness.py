"""What every benchmark's ``main`` does around its measurements, and the small pieces
they share (progress lines, argument checks, iperf3, the daemon as a subprocess).

Refuse clearly when the machine cannot run it; turn SIGTERM into KeyboardInterrupt so the
sandbox is closed on the way out; exit 130 on an interrupt, 1 on an error or when the run
left anything behind, else print the report and exit 0 (goals are printed, not asserted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from types import FrameType
from typing import IO, TypeVar

from hns.daemon.control import request
from hns.testing.sandbox import Peer, Sandbox, leftovers, missing_requirements

__all__ = ["Daemon", "iperf_gbps", "positive_int", "progress", "run_hermetic",
           "start_daemon", "wait_until"]

T = TypeVar("T")


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_hermetic(measure: Callable[[], T], report: Callable[[T], None],
                 tools: Sequence[str] = ()) -> int:
    """Run ``measure`` (which builds and closes its own sandbox), then ``report`` it."""
    reason = missing_requirements() or next(
        (f"{tool} is missing" for tool in tools if not shutil.which(tool)), None)
    if reason:
        print(f"bench: cannot run: {reason}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        results = measure()
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        traceback.print_exc()
        print(f"bench: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    left = leftovers()
    if left:
        print(f"bench: error: left behind: {', '.join(left)}", file=sys.stderr)
        return 1
    report(results)
    return 0


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0,
               check: Callable[[], None] | None = None) -> None:
    """Poll ``predicate`` (readiness, OSError and ValueError count as not yet) every
    50 ms; ``check`` may raise to give up early; RuntimeError when time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if predicate():
                return
        if check is not None:
            check()
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def iperf_gbps(client: Peer, host: str, port: int, seconds: int) -> float:
    """One iperf3 run (``-O 1``); the receiver's rate in Gbit/s."""
    result = client.run(["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-O", "1",
                         "-J"], timeout=seconds + 60)
    data = json.loads(result.stdout or "{}")
    if result.returncode != 0 or "error" in data:
        raise RuntimeError(f"iperf3 to {host}:{port} from {client.netns} failed: "
                           f"{data.get('error') or result.stderr.strip()}")
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9


class Daemon:
    """``hnsctl daemon`` of a sandbox in the background; its stderr kept to say why it
    stopped."""

    def __init__(self, sb: Sandbox, proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
        self.sb = sb
        self.proc = proc
        self._log = log

    def answering(self) -> bool:
        answer = request(self.sb.state_dir, "status", timeout=2.0) or {}
        return answer.get("Running") is True

    def exited(self) -> str | None:
        """None while running, else a one-line reason."""
        if self.proc.poll() is None:
            return None
        self._log.seek(0)
        lines = self._log.read().decode(errors="replace").strip().splitlines()
        return f"exit {self.proc.returncode}: {lines[-1] if lines else 'no message'}"

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        """:func:`wait_until`, failing at once if the daemon exits."""
        def alive() -> None:
            reason = self.exited()
            if reason is not None:
                raise RuntimeError(f"the daemon exited ({reason}) waiting for {what}")
        wait_until(predicate, what, timeout, alive)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def start_daemon(sb: Sandbox, *args: str) -> Daemon:
    """The sandbox's daemon (``hnsctl daemon ARGS``), once it answers (RuntimeError,
    stopped, if it does not)."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 -- closed by Daemon.stop
    daemon = Daemon(sb, subprocess.Popen([*sb.hnsctl_argv(), "daemon", *args],
                                         stdout=subprocess.DEVNULL, stderr=log), log)
    try:
        daemon.wait(daemon.answering, "the daemon to answer")
    except BaseException:
        daemon.stop()
        raise
    return daemon
