"""The plugin's options and hooks: prefix, keep on failure, captures, diagnostics, the
stale sandboxes of dead runs and the end-of-session leak check.

Theory of operation.  A sandbox made by a fixture is *adopted*: the plugin learns the
pytest temporary directory and hooks the sandbox's VM creation, so that a VM made while
a test runs is captured for that test.  ``pytest_runtest_makereport`` (the outermost
wrapper: it sees the final report) keeps each phase's report on the item, stops the
test's captures once the outcome is known, and on a failure adds the ``hns
diagnostics``, ``hns sandbox kept`` and ``hns capture`` sections.  Fixture teardown
then asks :func:`keeping` whether to keep or remove what the test made.

At the end of the session the check of what was left runs *after* pytest's own teardown
(a wrapper of ``pytest_sessionfinish``, past its ``yield``): every fixture's sandbox is
closed by then.  After an interruption (Ctrl-C) the sandboxes still open are closed
first and the exit status stays ``INTERRUPTED``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hns.testing.pcap import MODES, Captures
from hns.testing.report import KeptSandbox, capture_text, kept_text

__all__ = ["adopt", "keep_sandbox", "keeping", "settings"]


@dataclass
class Settings:
    """The plugin's options and what it gathered during the session."""

    prefix: str = "hnst-"
    keep_on_failure: bool = False
    capture: str = "never"
    tmp_factory: Any = None
    capture_dir: Path | None = None
    current: pytest.Item | None = None
    stale_removed: list[str] = field(default_factory=list)
    stale_kept: int = 0
    kept: list[str] = field(default_factory=list)          # kept sandboxes' texts
    pcaps: list[str] = field(default_factory=list)         # kept pcap files
    session_failed: bool = False      # a test that used the session sandbox failed


SETTINGS = pytest.StashKey[Settings]()
REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()
CAPTURES = pytest.StashKey[Captures]()


def settings(config: pytest.Config) -> Settings:
    if SETTINGS not in config.stash:
        config.stash[SETTINGS] = Settings()
    return config.stash[SETTINGS]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hns", "hns sandboxes")
    group.addoption("--hns-prefix", default="hnst-", metavar="PREFIX",
                    help="namespace name prefix of this run's sandboxes (default: hnst-)")
    group.addoption("--hns-keep-on-failure", action="store_true", default=False,
                    help="keep a failing test's sandbox and say how to enter it")
    group.addoption("--hns-capture", default="never", choices=MODES,
                    help="pcap of each VM's traffic during a test: kept never (the "
                         "default: no capture), on-failure or always")


def pytest_configure(config: pytest.Config) -> None:
    from hns.testing.sandbox import set_default_prefix
    state = settings(config)
    state.prefix = str(config.getoption("--hns-prefix"))
    state.keep_on_failure = bool(config.getoption("--hns-keep-on-failure"))
    state.capture = str(config.getoption("--hns-capture"))
    try:
        set_default_prefix(state.prefix)
    except ValueError as exc:
        raise pytest.UsageError(f"--hns-prefix: {exc}") from None


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remove the sandboxes of dead runs (not the ones kept on purpose)."""
    if os.geteuid() != 0:
        return
    from hns.testing.stale import remove_stale_sandboxes, stale_records
    state = settings(session.config)
    try:
        state.stale_removed = remove_stale_sandboxes(kept=False)
        state.stale_kept = len(stale_records(kept=True))
    except Exception as exc:     # never stop a session for this
        state.stale_removed = [f"(failed: {exc})"]


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = settings(config)
    lines = []
    if state.stale_removed:
        lines.append("hns: removed stale sandboxes: " + ", ".join(state.stale_removed))
    if state.stale_kept:
        lines.append(f"hns: kept sandboxes of ended runs: {state.stale_kept} "
                     "('hnsctl gc --sandboxes' removes them)")
    return lines


# --- sandboxes made by fixtures -----------------------------------------------------------

def adopt(request: pytest.FixtureRequest, sandbox: Any) -> None:
    """Route the VMs made in ``sandbox`` to the running test's captures."""
    config = request.config
    state = settings(config)
    if state.tmp_factory is None:
        state.tmp_factory = request.getfixturevalue("tmp_path_factory")

    def on_vm(vm: Any) -> None:
        if state.current is not None and state.capture != "never":
            _captures(state.current).add(sandbox, vm)

    sandbox.vm_hooks.append(on_vm)


def _failed(item: pytest.Item) -> bool:
    reports = item.stash.get(REPORTS, {})
    return any(r.failed for when, r in reports.items() if when in ("setup", "call"))


def keeping(request: pytest.FixtureRequest) -> bool:
    """Whether what the test made stays: ``--hns-keep-on-failure`` and it failed."""
    return settings(request.config).keep_on_failure and isinstance(request.node, pytest.Item) \
        and _failed(request.node)


def keep_sandbox(config: pytest.Config, sandbox: Any) -> None:
    """Keep ``sandbox`` and remember how to enter it for the summary."""
    info = _kept_info(sandbox)
    sandbox.keep()
    settings(config).kept.append(kept_text(info))


def _kept_info(sandbox: Any) -> KeptSandbox:
    try:
        vm_netns = tuple(vm.netns for vm in sandbox.service.list_vms())
    except Exception:
        vm_netns = tuple(vm.netns for vm in sandbox.vms)
    return KeptSandbox(sandbox.host_netns, sandbox.outside_netns, sandbox.state_dir, vm_netns)


# --- captures -----------------------------------------------------------------------------

def _capture_dir(state: Settings) -> Path:
    if state.capture_dir is None:
        if state.tmp_factory is not None:
            state.capture_dir = Path(state.tmp_factory.getbasetemp()) / "hns-capture"
            state.capture_dir.mkdir(exist_ok=True)
        else:
            state.capture_dir = Path(tempfile.mkdtemp(prefix="hns-capture-"))
    return state.capture_dir


def _captures(item: pytest.Item) -> Captures:
    if CAPTURES not in item.stash:
        item.stash[CAPTURES] = Captures(_capture_dir(settings(item.config)), item.nodeid)
    return item.stash[CAPTURES]


def _finish_captures(item: pytest.Item, failed: bool) -> str | None:
    """Stop the item's captures, keep or delete the files; the section text."""
    caps = item.stash.get(CAPTURES, None)
    if caps is None or caps.finished:
        return None
    state = settings(item.config)
    keep = state.capture == "always" or (state.capture == "on-failure" and failed)
    files = caps.finish(keep)
    if keep:
        state.pcaps += [f.path for f in files if f.error is None]
    return capture_text(files, keep) if files else None


def _sandboxes(item: pytest.Item) -> list[Any]:
    from hns.testing.sandbox import Sandbox
    found: dict[int, Any] = {}
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Sandbox):
            found.setdefault(id(value), value)
    return list(found.values())


def _daemon_of(item: pytest.Item, sandbox: Any) -> Any:
    from hns.testing.daemon import HnsDaemon
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, HnsDaemon) and value.sandbox is sandbox:
            return value
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    state = settings(item.config)
    state.current = item
    try:
        return (yield)
    finally:
        state.current = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Capture the VMs the test's sandboxes had before it began (a session sandbox's)."""
    if settings(item.config).capture != "never":
        for sandbox in _sandboxes(item):
            for vm in sandbox.vms:
                _captures(item).add(sandbox, vm)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    _finish_captures(item, _failed(item))    # before the fixtures remove the VMs
    return (yield)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(REPORTS, {})[report.when] = report
    if report.when == "teardown":
        return report
    if report.when == "call" or report.failed:
        text = _finish_captures(item, report.failed)
        if report.failed:
            _failure_sections(item, report)
        if text:
            report.sections.append(("hns capture", text))
    return report


def _failure_sections(item: pytest.Item, report: pytest.TestReport) -> None:
    from hns.testing.diagnostics import collect
    state = settings(item.config)
    sandboxes = _sandboxes(item)
    if report.when == "call" and sandboxes:
        texts = [collect(s, _daemon_of(item, s)) for s in sandboxes]
        report.sections.append(("hns diagnostics", "\n".join(texts)))
    if not state.keep_on_failure:
        return
    session = getattr(item, "funcargs", {}).get("hns_session_sandbox")
    if session is not None:
        state.session_failed = True
    kept = [kept_text(_kept_info(s)) for s in sandboxes if s is not session]
    if session is not None:
        kept.append("the session sandbox is kept at the end of the session:\n"
                    + kept_text(_kept_info(session)))
    if kept:
        report.sections.append(("hns sandbox kept", "\n".join(kept)))


# --- the end of the session -------------------------------------------------------------

@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session: pytest.Session) -> Generator[None, None, None]:
    result = yield                     # pytest's teardown of every fixture ran in there
    from hns.testing.sandbox import leftovers, live_sandboxes
    interrupted = session.exitstatus == pytest.ExitCode.INTERRUPTED
    if interrupted:                    # a test cut short: close what it had open first
        for sandbox in live_sandboxes():
            sandbox.close()
        found = leftovers()
    else:                              # still open now: a sandbox a test never closed
        found = leftovers()
        for sandbox in live_sandboxes():
            sandbox.close()
    if found:
        _write(session, "hns: sandbox objects left behind: " + ", ".join(found))
        if not interrupted and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    return result


def _write(session: pytest.Session, message: str) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(message, red=True)
    else:
        print(message)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    state = settings(terminalreporter.config)
    if state.kept:
        terminalreporter.section("hns: kept sandboxes")
        for text in state.kept:
            terminalreporter.write(text)
    if state.pcaps:
        terminalreporter.section("hns: packet captures")
        for path in state.pcaps:
            terminalreporter.write_line(path)
