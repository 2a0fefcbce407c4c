"""A pytest run that is interrupted (Ctrl-C: SIGINT) ends with pytest's exit code 2 and
leaves nothing; one that is SIGKILLed leaves its sandbox, which the next session removes
at its start, and so does ``hnsctl gc --sandboxes``.

The runs are pytests of their own (``python -m pytest`` on a test written by pytester),
each with a prefix and an owner-record directory of its own.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hns.netns import list_netns, netns_exists
from hns.testing import remove_stale_sandboxes, wait_until

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

SLEEPER = """
import json, os, time


def test_sleeps(hns_sandbox, nat_vm, hns_daemon):
    with open(os.environ["MARKER"] + ".tmp", "w") as f:
        json.dump({"host": hns_sandbox.host_netns, "outside": hns_sandbox.outside_netns,
                   "vm": nat_vm.netns, "state_dir": hns_sandbox.state_dir,
                   "daemon": hns_daemon.proc.pid}, f)
    os.rename(os.environ["MARKER"] + ".tmp", os.environ["MARKER"])
    time.sleep(120)
"""


class Run:
    """One pytest subprocess running ``SLEEPER`` with its own prefix and records."""

    def __init__(self, pytester: pytest.Pytester, tmp_path: Path, name: str) -> None:
        self.pytester = pytester
        self.prefix = f"t{secrets.token_hex(3)}-"
        self.records = str(tmp_path / "records")
        self.marker = tmp_path / f"{name}.json"
        pytester.makepyfile(**{f"test_{name}": SLEEPER})
        self.file = f"test_{name}.py"
        self.proc: subprocess.Popen[str] | None = None

    def env(self) -> dict[str, str]:
        return dict(os.environ, HNS_SANDBOX_RECORDS=self.records, MARKER=str(self.marker))

    def start(self) -> dict[str, object]:
        """Start it and wait until its test runs; what the test wrote."""
        self.proc = proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
             f"--hns-prefix={self.prefix}", self.file], cwd=self.pytester.path,
            env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: self.marker.exists() or proc.poll() is not None, timeout=120,
                   what="the test to start")
        assert self.marker.exists(), proc.communicate()[0]
        return dict(json.loads(self.marker.read_text()))

    def ours(self) -> list[str]:
        return [ns for ns in list_netns() if ns.startswith(self.prefix)]

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.communicate(timeout=60)
        remove_stale_sandboxes(prefix=self.prefix, directory=self.records)


@pytest.fixture
def make_run(pytester: pytest.Pytester, tmp_path: Path) -> Iterator[Callable[[str], Run]]:
    made: list[Run] = []

    def make(name: str) -> Run:
        made.append(Run(pytester, tmp_path, name))
        return made[-1]

    yield make
    for run in made:
        run.cleanup()
    for run in made:
        assert not run.ours(), run.ours()


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_ctrl_c_ends_with_exit_2_and_leaves_nothing(make_run: Callable[[str], Run]) -> None:
    run = make_run("interrupted")
    seen = run.start()
    assert run.proc is not None
    run.proc.send_signal(signal.SIGINT)
    out, _ = run.proc.communicate(timeout=120)
    assert run.proc.returncode == 2, out
    assert "KeyboardInterrupt" in out
    assert "left behind" not in out
    assert run.ours() == []
    assert not netns_exists(str(seen["vm"]))
    assert not os.path.exists(str(seen["state_dir"]))
    assert gone(int(str(seen["daemon"])))
    assert not [n for n in os.listdir(run.records) if n.endswith(".json")]  # its record


def killed(run: Run) -> dict[str, object]:
    """Start ``run``, SIGKILL it in its test; what the test had made (all still there)."""
    seen = run.start()
    assert run.proc is not None
    run.proc.kill()
    run.proc.communicate(timeout=60)
    for ns in (seen["host"], seen["outside"], seen["vm"]):
        assert netns_exists(str(ns)), ns
    assert os.path.isdir(str(seen["state_dir"]))
    return seen


def assert_removed(seen: dict[str, object], run: Run) -> None:
    for ns in (seen["host"], seen["outside"], seen["vm"]):
        assert not netns_exists(str(ns)), ns
    assert not os.path.exists(f"/etc/netns/{seen['vm']}")
    assert not os.path.exists(str(seen["state_dir"]))
    assert not [n for n in os.listdir(run.records) if n.endswith(".json")]
    wait_until(lambda: gone(int(str(seen["daemon"]))), timeout=15,
               what="the killed run's daemon to end")


def test_a_new_session_removes_a_killed_runs_sandbox(
        make_run: Callable[[str], Run], pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    run = make_run("killed")
    seen = killed(run)
    monkeypatch.setenv("HNS_SANDBOX_RECORDS", run.records)
    pytester.makepyfile(test_empty="def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "test_empty.py",
                                           timeout=300)
    result.assert_outcomes(passed=1)
    header = result.stdout.str().split("collected", 1)[0]
    assert "hns: removed stale sandboxes:" in header
    for ns in (seen["host"], seen["outside"], seen["vm"]):
        assert f"netns {ns}" in header
    assert f"state dir {seen['state_dir']}" in header
    assert_removed(seen, run)


def test_hnsctl_gc_sandboxes_removes_a_killed_runs_sandbox(make_run: Callable[[str], Run]) -> None:
    run = make_run("killed_gc")
    seen = killed(run)
    hnsctl = [sys.executable, "-m", "hns.cli", "gc", "--sandboxes"]
    dry = subprocess.run([*hnsctl, "--dry-run"], env=run.env(), capture_output=True,
                         text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    for ns in (seen["host"], seen["outside"], seen["vm"]):
        assert f"would remove netns {ns}" in dry.stdout.splitlines()
        assert netns_exists(str(ns))                      # a dry run removes nothing
    done = subprocess.run(hnsctl, env=run.env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for ns in (seen["host"], seen["outside"], seen["vm"]):
        assert f"removed netns {ns}" in done.stdout.splitlines()
    assert f"removed state dir {seen['state_dir']}" in done.stdout.splitlines()
    assert_removed(seen, run)
    again = subprocess.run(hnsctl, env=run.env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout == ""


def test_a_living_runs_sandbox_is_never_removed(make_run: Callable[[str], Run]) -> None:
    run = make_run("alive")
    seen = run.start()
    dry = subprocess.run([sys.executable, "-m", "hns.cli", "gc", "--sandboxes"],
                         env=run.env(), capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0 and dry.stdout == "", dry
    assert netns_exists(str(seen["host"])) and netns_exists(str(seen["vm"]))
    assert run.proc is not None and run.proc.poll() is None
