"""``hnsctl capture VM|NETWORK [-w FILE.pcap] [--count N] [--duration S] [FILTER...]``:
packets on a VM's host-side veth or a network's bridge, in the host namespace.

Everything is checked before any file or socket is opened -- the count, the duration,
the BPF filter (compiled by libpcap through scapy), the output's directory, the name --
so a bad request leaves nothing behind.  Then the socket listens (:mod:`hns.capture_io`),
the file is created, and the capture runs until the count, the duration, or SIGINT /
SIGTERM, each of which ends it cleanly: the file closed, the totals printed, exit 0.

Output: without ``-w`` a line per packet on stdout (:mod:`hns.capture_format`); with it a
pcap file and, when stderr is a terminal, a progress line refreshed at most four times a
second.  A final line on stderr always.  ``--json``: stdout holds only the JSON summary
(the packet lines, if any, go to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from hns.capture_format import Progress, final_line, packet_line, progress_text, summary_json
from hns.capture_io import PcapSink, Pump, Recorder, Waker, open_listener
from hns.errors import Conflict, HnsError, InvalidRequest, NotFound

__all__ = ["CaptureRequest", "Recorder", "Target", "capture_cmd", "check_filter",
           "check_output", "parse_count", "parse_duration", "parse_request", "recorder_for",
           "resolve_target"]

DIGITS_RE = re.compile(r"[0-9]+")
MAX_COUNT = 2**63 - 1
MAX_DURATION = 10 * 365 * 86400.0     # ten years: anything longer is a typo
PROG = "hnsctl"


@dataclass(frozen=True)
class CaptureRequest:
    """A checked ``capture`` request."""

    what: str
    path: str | None
    count: int | None
    duration: float | None
    bpf: str | None


@dataclass(frozen=True)
class Target:
    """What a name captures on: ``kind`` is ``vm`` or ``network``."""

    kind: str
    name: str
    ifname: str


def parse_count(text: str | None) -> int | None:
    """``--count``: a whole number >= 1, or None."""
    if text is None:
        return None
    value = text.strip()
    if not DIGITS_RE.fullmatch(value) or int(value) < 1 or int(value) > MAX_COUNT:
        raise InvalidRequest(f"bad --count {text!r}: a whole number of packets, 1 or more")
    return int(value)


def parse_duration(text: str | None) -> float | None:
    """``--duration``: seconds, a number > 0 (fractions allowed), or None."""
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if not (0 < value <= MAX_DURATION):      # also refuses nan and inf
        raise InvalidRequest(f"bad --duration {text!r}: seconds, a number above 0")
    return value


def check_filter(bpf: str | None) -> str | None:
    """``bpf`` if libpcap compiles it for Ethernet (None or blank: no filter)."""
    if bpf is None or not bpf.strip():
        return None
    from scapy.arch.common import compile_filter, free_filter
    from scapy.data import DLT_EN10MB
    from scapy.error import Scapy_Exception
    try:
        program = compile_filter(bpf, linktype=DLT_EN10MB)
    except ImportError:
        raise HnsError("capture filters need libpcap (Debian: libpcap0.8)") from None
    except Scapy_Exception as exc:
        found = re.search(r"\(([^()]*)\)\s*$", str(exc))
        why = found.group(1) if found else str(exc)
        raise InvalidRequest(f"bad filter {bpf!r}: {why}") from None
    free_filter(program)
    return bpf


def check_output(path: str | None) -> None:
    """InvalidRequest unless ``path`` (if given) can be created as a file."""
    if path is None:
        return
    if not path or path.endswith("/"):
        raise InvalidRequest(f"bad -w {path!r}: a file name is needed")
    if os.path.isdir(path):
        raise InvalidRequest(f"bad -w {path!r}: a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InvalidRequest(f"bad -w {path!r}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidRequest(f"bad -w {path!r}: directory {parent} is not writable")


def parse_request(what: str, path: str | None, count: str | None, duration: str | None,
                  words: Sequence[str]) -> CaptureRequest:
    """The command's arguments checked (nothing opened, nothing made)."""
    n = parse_count(count)
    seconds = parse_duration(duration)
    bpf = check_filter(" ".join(words) if words else None)
    check_output(path)
    return CaptureRequest(what, path, n, seconds, bpf)


def resolve_target(svc: Any, what: str) -> Target:
    """A VM's host-side veth, else a network's bridge; NotFound when neither has the
    name, Conflict for a stopped VM (it has no veth)."""
    try:
        vm = svc.get_vm(what)
    except NotFound:
        pass
    else:
        if not vm.running:
            raise Conflict(f"vm {vm.name!r} is stopped, nothing to capture on "
                           f"(start it: {PROG} vm start {vm.name})")
        return Target("vm", vm.name, vm.host_ifname)
    try:
        net = svc.get_network(what)
    except NotFound:
        raise NotFound(f"no vm or network named {what!r}") from None
    return Target("network", net.name, net.bridge)


def recorder_for(svc: Any, what: str, path: str, bpf: str | None = None) -> Recorder:
    """A :class:`Recorder` on the interface of the VM or network named ``what``."""
    return Recorder(svc.host_netns, resolve_target(svc, what).ifname, path, bpf)


@contextlib.contextmanager
def _stop_on_signals(waker: Waker) -> Iterator[None]:
    """SIGINT and SIGTERM wake the capture instead of raising (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = lambda signum, frame: waker.wake()  # noqa: E731
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def _line_printer(out: IO[str]) -> Callable[[bytes, float], None]:
    def show(frame: bytes, ts: float) -> None:
        out.write(packet_line(frame, ts) + "\n")
        out.flush()
    return show


def _progress_ticker(pump: Pump, err: IO[str]) -> Callable[[], None]:
    progress = Progress()

    def tick() -> None:
        if progress.due(time.monotonic()):
            err.write(f"\r{progress_text(pump.totals())}\x1b[K")
            err.flush()
    return tick


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _run(req: CaptureRequest, target: Target, sock: Any, as_json: bool) -> int:
    out, err = sys.stdout, sys.stderr
    with contextlib.ExitStack() as stack:
        waker = Waker()
        stack.callback(waker.close)
        stack.enter_context(_stop_on_signals(waker))   # before anything is announced
        sink = PcapSink(req.path) if req.path else None
        if sink is not None:
            stack.callback(sink.close)
        on_frame = sink.frame if sink else _line_printer(err if as_json else out)
        pump = Pump(sock, on_frame, req.count, req.duration)
        tty = sink is not None and _is_tty(err)
        err.write(f"capturing on {target.ifname} ({target.kind} {target.name})"
                  + (f" into {req.path}" if req.path else "") + ", Ctrl-C stops\n")
        err.flush()
        reason = pump.run(waker, _progress_ticker(pump, err) if tty else None)
    totals = pump.totals()
    reason = "interrupted" if reason == "stopped" else reason
    err.write(("\r" if tty else "") + final_line(totals, target.ifname, req.path, reason)
              + ("\x1b[K" if tty else "") + "\n")
    err.flush()
    if as_json:
        print(json.dumps(summary_json(totals, target.ifname, req.path), indent=2))
    return 0


def capture_cmd(svc: Any, args: argparse.Namespace) -> int:
    """``hnsctl capture``: checked, then listening, then the file, then the capture."""
    req = parse_request(args.what, args.write, args.count, args.duration, args.filter)
    target = resolve_target(svc, req.what)
    sock = open_listener(svc.host_netns, target.ifname, req.bpf)
    try:
        try:
            return _run(req, target, sock, bool(getattr(args, "json", False)))
        except OSError as exc:
            if req.path and exc.filename == req.path:
                raise InvalidRequest(f"cannot write {req.path!r}: {exc.strerror}") from None
            raise
    finally:
        sock.close()
