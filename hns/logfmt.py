"""hnsctl's log lines: one line per record, with journald's priority prefix under systemd.

A record is printed as ``hnsctl: LEVEL: message`` on one line: line breaks and other
control characters in the message (which may echo user input, or a kernel's or nft's
several lines) are escaped (``\\n``), and an exception is appended as ``: Type: text``
(with ``tracebacks``, the whole traceback, escaped on the same line).

Under systemd, journald reads a service's stderr line by line, and a line that starts
with ``<N>`` is stored at syslog priority N (sd-daemon(3); ``SyslogLevelPrefix=``, on by
default): ``<3>`` error, ``<4>`` warning, ``<6>`` info, ``<7>`` debug (``<2>`` critical).
The prefix is written only when stderr *is* the journal: systemd names that stream in
``$JOURNAL_STREAM`` (``DEVICE:INODE``, systemd.exec(5)), which is compared with the
stream's own.  A terminal, a pipe, a file (the spawned daemon's ``daemon.log``) or a
child that inherited the variable with another stderr get the lines without it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

from hns.errors import InvalidRequest

__all__ = ["LEVELS", "LineFormatter", "configure_logging", "is_journal", "line_prefix",
           "parse_level", "printable", "priority"]

LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO,
          "debug": logging.DEBUG}


def parse_level(text: str) -> int:
    """A ``--log-level`` word (any case) as a :mod:`logging` level."""
    level = LEVELS.get(text.lower()) if text.isascii() else None
    if level is None:
        raise InvalidRequest(f"invalid --log-level {printable(text)!r}: "
                             f"{', '.join(LEVELS)}")
    return level


def priority(levelno: int) -> int:
    """The syslog priority of a :mod:`logging` level (levels in between round up)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    return 6 if levelno >= logging.INFO else 7


def printable(text: str) -> str:
    """``text`` with line breaks and other control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def is_journal(stream: TextIO | None) -> bool:
    """Whether ``stream`` is the journal stream systemd named in ``$JOURNAL_STREAM``."""
    dev, sep, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (sep and dev.isdigit() and ino.isdigit()) or stream is None:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):   # no descriptor (StringIO), closed
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def line_prefix(levelno: int, stream: TextIO | None) -> str:
    """``<N>`` for a line of that level written to ``stream``, if it is the journal."""
    return f"<{priority(levelno)}>" if is_journal(stream) else ""


class LineFormatter(logging.Formatter):
    """``[<N>]PROG: LEVEL: message``, always one line (see the module)."""

    def __init__(self, prog: str = "hnsctl", *, syslog_prefix: bool = False,
                 tracebacks: bool = False) -> None:
        super().__init__()
        self.prog = prog
        self.syslog_prefix = syslog_prefix
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and record.exc_info is not None:
            text += ("\n" + self.formatException(record.exc_info) if self.tracebacks
                     else f": {type(exc).__name__}: {exc}")
        if record.stack_info and self.tracebacks:
            text += "\n" + self.formatStack(record.stack_info)
        line = f"{self.prog}: {record.levelname.lower()}: {printable(text)}"
        return f"<{priority(record.levelno)}>{line}" if self.syslog_prefix else line


class _Handler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure_logging` installs (and replaces when called again)."""


class _Nowhere(logging.NullHandler):
    """What :func:`configure_logging` installs when there is no stderr (it was closed)."""


def configure_logging(level: str | None, debug: bool,
                      stream: TextIO | None = None) -> logging.Handler:
    """Log records of ``level`` (``--log-level``: error|warning|info|debug; default
    warning, debug with ``debug``) and above to ``stream`` (default: ``sys.stderr`` as it
    is at the call) in :class:`LineFormatter`'s lines, with tracebacks when ``debug``.

    InvalidRequest for another level, before anything is changed.  Called again, it
    replaces the handler it installed before; other handlers of the root logger stay."""
    threshold = parse_level(level) if level is not None else (
        logging.DEBUG if debug else logging.WARNING)
    out = sys.stderr if stream is None else stream
    handler: logging.Handler = _Nowhere() if out is None else _Handler(out)
    handler.setFormatter(LineFormatter(syslog_prefix=is_journal(out), tracebacks=debug))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler | _Nowhere)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)
    return handler
