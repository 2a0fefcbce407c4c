"""What every benchmark's ``main`` does around its measurements.

Refuse clearly when the machine cannot run it; turn SIGTERM into KeyboardInterrupt so the
sandbox is closed on the way out; exit 130 on an interrupt, 1 on an error or when the run
left anything behind, else print the report and exit 0 (goals are printed, not asserted).
"""

from __future__ import annotations

import shutil
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TypeVar

from hns.testing.sandbox import leftovers, missing_requirements

__all__ = ["run_hermetic"]

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
