"""Starting and stopping the daemon for ``hnsctl up`` and ``down`` (docs/service.md).

``up`` makes sure a daemon serves its state directory: one that answers on the control
socket already does; under systemd, for the unit's state directory, the unit is started;
otherwise ``hnsctl daemon`` is started detached (its own session, stdin from /dev/null,
stdout and stderr appended to ``<state-dir>/daemon.log``) and waited for until it answers
``status``.  Its pid goes into ``<state-dir>/daemon.spawned``: ``down`` stops that daemon
(SIGTERM) if the pid still holds the daemon lock, and no other.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hns.daemon.control import request
from hns.errors import HnsError

__all__ = ["LOG_FILE", "SPAWNED_FILE", "Started", "serving", "start", "stop_spawned"]

LOG_FILE = "daemon.log"
SPAWNED_FILE = "daemon.spawned"
UNIT = "hns.service"
UNIT_STATE_DIR = "/var/lib/hns"      # contrib/hns.service's
START_TIMEOUT = 20.0                 # s for a new daemon to answer
STOP_TIMEOUT = 15.0


class DaemonStartError(HnsError):
    """The daemon did not come up (exit 1)."""


@dataclass(frozen=True)
class Started:
    how: str                 # "running" | "systemd" | "started"
    pid: int | None
    log: str | None = None


def serving(state_dir: str | os.PathLike[str]) -> int | None:
    """The pid of the daemon that answers for ``state_dir``, or None."""
    try:
        answer = request(state_dir, "status", timeout=3.0)
    except (OSError, ValueError):
        return None
    if answer is None or not answer.get("Running"):
        return None
    pid = answer.get("Pid")
    return int(pid) if isinstance(pid, int) else 0


def _systemd_owns(state_dir: str | os.PathLike[str]) -> bool:
    if not os.path.isdir("/run/systemd/system") or shutil.which("systemctl") is None:
        return False
    if os.path.realpath(state_dir) != UNIT_STATE_DIR:
        return False
    found = subprocess.run(["systemctl", "cat", UNIT], capture_output=True, check=False)
    return found.returncode == 0


def start(state_dir: str | os.PathLike[str], host_netns: str | None,
          config: str | None = None, timeout: float = START_TIMEOUT) -> Started:
    """Make sure a daemon serves ``state_dir`` (see the module); ``config``: the
    settings file the daemon reads again on SIGHUP."""
    pid = serving(state_dir)
    if pid is not None:
        return Started("running", pid)
    if _systemd_owns(state_dir):
        done = subprocess.run(["systemctl", "start", UNIT], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            raise DaemonStartError(f"systemctl start {UNIT} failed: "
                                   f"{done.stderr.strip() or done.returncode}")
        return Started("systemd", serving(state_dir))
    return _spawn(Path(state_dir), host_netns, config, timeout)


def _spawn(state_dir: Path, host_netns: str | None, config: str | None,
           timeout: float) -> Started:
    argv = [sys.executable, "-m", "hns.cli", "--state-dir", str(state_dir)]
    if host_netns:
        argv += ["--host-netns", host_netns]
    if config:
        argv += ["--config", os.path.abspath(config)]
    log_path = state_dir / LOG_FILE
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([*argv, "daemon"], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True, close_fds=True)
    (state_dir / SPAWNED_FILE).write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serving(state_dir) is not None:
            return Started("started", proc.pid, str(log_path))
        if proc.poll() is not None:
            _forget(state_dir, proc.pid)
            raise DaemonStartError(f"the daemon exited ({proc.returncode}): "
                                   f"{_last_line(log_path)} (log: {log_path})")
        time.sleep(0.05)
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    _forget(state_dir, proc.pid)
    raise DaemonStartError(f"the daemon did not answer within {timeout:.0f} s "
                           f"(log: {log_path})")


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1].strip() if lines else "no output"


def _forget(state_dir: Path, pid: int) -> None:
    path = state_dir / SPAWNED_FILE
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip() or 0) == pid:
            path.unlink()


def _lock_holder(state_dir: Path) -> int | None:
    from hns.daemon.daemon import DaemonLock
    return DaemonLock(state_dir).holder()


def stop_spawned(state_dir: str | os.PathLike[str], timeout: float = STOP_TIMEOUT
                 ) -> int | None:
    """Stop the daemon ``up`` started for ``state_dir``; its pid, or None when there was
    none (or it was not ``up``'s any more)."""
    state = Path(state_dir)
    try:
        pid = int((state / SPAWNED_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    if _lock_holder(state) != pid:
        _forget(state, pid)
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _lock_holder(state) == pid and time.monotonic() < deadline:
        time.sleep(0.05)
    if _lock_holder(state) == pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _forget(state, pid)
    return pid
