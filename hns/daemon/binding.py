"""Listen with retry: the one way a daemon component keeps trying to bind a socket.

A port may be taken (another program, a TIME_WAIT, a VM's claim), an address or a
bridge may not exist yet: the attempt is made again every ``interval`` seconds until it
succeeds or is cancelled; the error is kept (``status`` shows it) and logged when it
changes, not at every try.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from portproxy.engine import Engine, TimerHandle

__all__ = ["Bound", "Retrying", "strerror"]

log = logging.getLogger("hns.daemon")


def strerror(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


class Retrying:
    """``attempt()`` binds (and hands the socket on) or raises OSError; ``what`` names
    it in the log ("proxy X: cannot listen")."""

    def __init__(self, engine: Engine, what: str, attempt: Callable[[], None],
                 interval: float, describe: Callable[[OSError], str] = strerror) -> None:
        self.engine = engine
        self.what = what
        self.attempt = attempt
        self.interval = interval
        self.describe = describe
        self.error: str | None = None
        self._timer: TimerHandle | None = None

    def start(self) -> None:
        """Try now; on failure keep the error and try again after ``interval``."""
        self._timer = None
        try:
            self.attempt()
        except OSError as exc:
            message = self.describe(exc)
            if message != self.error:
                log.warning("%s: %s (retrying every %gs)", self.what, message, self.interval)
            self.error = message
            self._timer = self.engine.call_later(self.interval, self.start)
            return
        self.error = None

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


@dataclass
class Bound:
    """Base of what a component serves on a socket bound with retry: its ``binding``
    (None until first tried) and the error it keeps."""

    binding: Retrying | None = field(default=None, repr=False, kw_only=True)

    @property
    def error(self) -> str | None:
        return self.binding.error if self.binding is not None else None
