"""hns.logfmt: one line per record, journald's ``<N>`` prefix only on the journal stream."""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from hns import cli
from hns.errors import InvalidRequest
from hns.logfmt import (
    LineFormatter,
    configure_logging,
    is_journal,
    line_prefix,
    parse_level,
    priority,
)


@pytest.fixture(autouse=True)
def _root_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test gets the root logger back as it found it, and no $JOURNAL_STREAM."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TextIO]:
    """A file that $JOURNAL_STREAM names, as systemd names a service's stderr."""
    with open(tmp_path / "journal", "w+", encoding="utf-8") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        yield stream


def record(level: int, msg: str, *args: object,
           exc: BaseException | None = None) -> logging.LogRecord:
    info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("hns.daemon", level, __file__, 1, msg, args, info)


def test_sd_daemon_priorities() -> None:
    assert [priority(level) for level in (logging.CRITICAL, logging.ERROR, logging.WARNING,
                                          logging.INFO, logging.DEBUG)] == [2, 3, 4, 6, 7]
    assert priority(logging.WARNING + 5) == 4 and priority(logging.INFO - 5) == 7
    assert priority(logging.DEBUG - 5) == 7


def test_a_record_is_one_line_with_line_breaks_escaped() -> None:
    line = LineFormatter().format(record(logging.WARNING, "nft said: %s", "a\nb\r\x1b[31m"))
    assert line == "hnsctl: warning: nft said: a\\nb\\r\\x1b[31m"
    prefixed = LineFormatter(syslog_prefix=True).format(record(logging.INFO, "daemon ready"))
    assert prefixed == "<6>hnsctl: info: daemon ready"
    assert LineFormatter(syslog_prefix=True).format(record(logging.DEBUG, "x")) == \
        "<7>hnsctl: debug: x"
    assert LineFormatter(syslog_prefix=True).format(record(logging.ERROR, "x")) == \
        "<3>hnsctl: error: x"


def test_an_exception_is_its_summary_or_with_tracebacks_the_whole_traceback() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError as exc:
        caught = exc
    short = LineFormatter().format(record(logging.ERROR, "cannot read the state", exc=caught))
    assert short == "hnsctl: error: cannot read the state: ValueError: bad\\nvalue"
    full = LineFormatter(tracebacks=True).format(record(logging.ERROR, "oops", exc=caught))
    assert "\n" not in full and full.startswith("hnsctl: error: oops\\nTraceback")
    assert full.endswith("ValueError: bad\\nvalue")


def test_the_journal_is_the_stream_journal_stream_names(journal: TextIO,
                                                        tmp_path: Path) -> None:
    assert is_journal(journal)
    assert line_prefix(logging.ERROR, journal) == "<3>"
    with open(tmp_path / "other", "w", encoding="utf-8") as other:   # e.g. daemon.log
        assert not is_journal(other) and line_prefix(logging.ERROR, other) == ""
    assert not is_journal(io.StringIO()) and not is_journal(None)


@pytest.mark.parametrize("value", ["", "1", "1:", ":2", "a:b", "1:2:3", "-1:2"])
def test_a_journal_stream_that_names_nothing(value: str, monkeypatch: pytest.MonkeyPatch,
                                             journal: TextIO) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", value)
    assert not is_journal(journal)


def test_a_closed_stream_is_not_the_journal(journal: TextIO) -> None:
    journal.close()
    assert not is_journal(journal)


@pytest.mark.parametrize("text, level", [("error", logging.ERROR), ("WARNING", logging.WARNING),
                                         ("Info", logging.INFO), ("debug", logging.DEBUG)])
def test_log_levels(text: str, level: int) -> None:
    assert parse_level(text) == level


@pytest.mark.parametrize("text", ["", "warn", "critical", "10", "\u0131nfo", "info\n", "debug2"])
def test_bad_log_levels(text: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid --log-level") as caught:
        parse_level(text)
    assert "\n" not in str(caught.value)


def test_configure_logging_levels_and_stream() -> None:
    out = io.StringIO()
    configure_logging(None, False, out)
    log = logging.getLogger("hns.test")
    log.info("not shown")
    log.warning("shown\ntwice?")
    assert out.getvalue() == "hnsctl: warning: shown\\ntwice?\n"
    configure_logging(None, True, out)
    assert logging.getLogger().level == logging.DEBUG
    configure_logging("error", True, out)
    log.warning("not shown")
    log.error("an error")
    assert out.getvalue().splitlines()[-1] == "hnsctl: error: an error"


def test_configure_logging_replaces_only_its_own_handler() -> None:
    root = logging.getLogger()
    other = logging.NullHandler()
    root.addHandler(other)
    first = configure_logging("info", False, io.StringIO())
    second = configure_logging("debug", False, io.StringIO())
    assert first not in root.handlers and second in root.handlers and other in root.handlers
    with pytest.raises(InvalidRequest):
        configure_logging("loud", False, io.StringIO())
    assert second in root.handlers and root.level == logging.DEBUG   # nothing changed


def test_configure_logging_prefixes_on_the_journal(journal: TextIO) -> None:
    configure_logging("debug", False, journal)
    logging.getLogger("hns.daemon").info("daemon ready")
    logging.getLogger("hns.daemon").debug("detail")
    journal.seek(0)
    assert journal.read() == "<6>hnsctl: info: daemon ready\n<7>hnsctl: debug: detail\n"


def test_configure_logging_defaults_to_stderr_as_it_is_now(
        capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(None, False)
    logging.getLogger("hns.test").warning("to stderr")
    assert capsys.readouterr().err == "hnsctl: warning: to stderr\n"


def test_no_stderr_logs_nowhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", None)
    configure_logging(None, False)
    logging.getLogger("hns.test").warning("lost")        # and nothing raises


HAS_LOG_LEVEL = "--log-level" in cli._build_parser()._option_string_actions


@pytest.mark.skipif(not HAS_LOG_LEVEL, reason="hns/cli.py has no --log-level yet")
def test_hnsctl_log_level(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HNS_LOG_LEVEL", raising=False)
    assert cli.main(["--log-level", "loud", "--state-dir", str(tmp_path), "status"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hnsctl: error: invalid --log-level 'loud'") and err.count("\n") == 1
    monkeypatch.setenv("HNS_LOG_LEVEL", "nope")
    assert cli.main(["--state-dir", str(tmp_path), "status"]) == 2
    assert "invalid --log-level 'nope'" in capsys.readouterr().err
