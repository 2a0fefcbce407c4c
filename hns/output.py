"""The command line's output: the one table printer (columns padded to the widest cell)
and what to do when stdout closes."""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Sequence

__all__ = ["human_bytes", "print_table", "silence_stdout", "stdout_closed"]


def print_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> None:
    """``header`` and ``rows`` on stdout, two spaces between columns, no trailing blanks."""
    lines = [[str(v) for v in row] for row in [header, *rows]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


def stdout_closed() -> bool:
    """True when nobody reads stdout any more (a pipe whose reader went away)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


def silence_stdout() -> None:
    """Point stdout at /dev/null, so the flush at exit cannot fail again (as the Python
    documentation on SIGPIPE recommends)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass


def human_bytes(n: int) -> str:
    """``n`` bytes in at most four digits and a unit: 999, 1.2K, 35K, 4.0M, 12G."""
    value = float(n)
    for unit in ("", "K", "M", "G", "T"):
        if value < 1000 or unit == "T":
            if not unit:
                return str(int(value))
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")
