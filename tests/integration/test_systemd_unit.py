"""contrib/hns.service: systemd-analyze finds nothing wrong with it, and its limits suffice.

No test installs, enables or starts the unit.  ``systemd-analyze verify`` and ``security
--offline`` read a copy whose commands name this virtualenv's hnsctl (the shipped unit
names /usr/local/bin/hnsctl, which need not exist here).  The unit's limits are applied
to hnsctl as systemd applies them: the capability bounding set and NoNewPrivileges
through setpriv(1), MemoryDenyWriteExecute as PR_SET_MDWE where the kernel has it
(6.3+); then restore, the daemon, a relay through it and its healing of a lost VM
namespace must work.  The last test shows why the unit sets no option that gives it a
mount namespace (ProtectSystem= and the like): a namespace named from inside one is an
empty file on the host.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.nsutil import wait_for

from hns.netns import delete_netns, netns_mounted
from hns.testing import Peer, Sandbox

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "contrib" / "hns.service"
DOCS = ROOT / "docs" / "daemon.md"
SHIPPED_HNSCTL = "/usr/local/bin/hnsctl"
HNSCTL = Path(sys.executable).parent / "hnsctl"
ANALYZE = shutil.which("systemd-analyze")
# MemoryDenyWriteExecute=, as the kernel's own switch (PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)
MDWE = ("import ctypes, os, sys; ctypes.CDLL(None).prctl(65, 1, 0, 0, 0); "
        "os.execv(sys.argv[1], sys.argv[1:])")
# options that give the service a mount namespace of its own (systemd.exec(5))
MOUNT_NAMESPACING = ("ProtectSystem", "ProtectHome", "PrivateTmp", "ReadWritePaths",
                     "ReadOnlyPaths", "InaccessiblePaths", "BindPaths", "TemporaryFileSystem",
                     "PrivateDevices", "PrivateMounts", "ProtectKernelTunables",
                     "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
                     "ProtectProc", "ProcSubset", "MountFlags", "RootDirectory")

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed "
                                   "(Debian: systemd)")


def settings(text: str) -> list[tuple[str, str, str]]:
    """A unit file's (section, key, value) lines, in order (keys may repeat)."""
    found, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def values(key: str) -> list[str]:
    return [v for _, k, v in settings(UNIT.read_text()) if k == key]


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with its commands pointing at this virtualenv's hnsctl."""
    if not HNSCTL.exists():
        pytest.skip(f"no hnsctl beside {sys.executable}")
    copy = tmp_path / "hns.service"
    copy.write_text(UNIT.read_text().replace(SHIPPED_HNSCTL, str(HNSCTL)))
    return copy


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=120,
                          check=False)


@needs_analyze
def test_verify_finds_nothing(unit_copy: Path) -> None:
    result = analyze("verify", str(unit_copy))
    about = [line for line in result.stderr.splitlines() if "hns.service" in line]
    assert result.returncode == 0 and about == [], result.stderr


@needs_analyze
def test_the_shipped_unit_differs_only_in_where_hnsctl_is(tmp_path: Path) -> None:
    result = analyze("verify", str(UNIT))
    about = [line for line in result.stderr.splitlines() if "hns.service" in line]
    if Path(SHIPPED_HNSCTL).exists():
        assert about == [], result.stderr
    else:
        assert about and all(SHIPPED_HNSCTL in line for line in about), result.stderr


def test_the_unit_s_contract() -> None:
    from hns.daemon.spawn import UNIT_STATE_DIR
    from hns.service import DEFAULT_STATE_DIR
    assert values("Type") == ["notify"] and values("NotifyAccess") == ["main"]
    assert values("Environment") == [f"HNS_STATE_DIR={UNIT_STATE_DIR}"]
    assert UNIT_STATE_DIR == DEFAULT_STATE_DIR == "/var/lib/hns"
    assert values("StateDirectory") == ["hns"] and values("RuntimeDirectory") == ["hns"]
    assert values("ExecStartPre") == [f"{SHIPPED_HNSCTL} restore"]
    assert values("ExecStart") == [f"{SHIPPED_HNSCTL} daemon"]
    assert values("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert values("NoNewPrivileges") == ["yes"]
    assert values("RestrictAddressFamilies") == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    keys = {k for _, k, _ in settings(UNIT.read_text())}
    assert not keys & set(MOUNT_NAMESPACING), "a mount namespace hides /run/netns mounts"


@needs_analyze
def test_the_exposure_score_is_the_documented_one(unit_copy: Path) -> None:
    result = analyze("security", "--offline=true", str(unit_copy))
    if result.returncode != 0 and "offline" in result.stderr:
        pytest.skip(f"systemd-analyze security has no --offline here: {result.stderr.strip()}")
    measured = re.search(r"Overall exposure level for hns\.service: (\d+\.\d)", result.stdout)
    documented = re.search(r"exposure level\s+\*\*(\d+\.\d)\*\*", DOCS.read_text())
    assert measured and documented, result.stdout[-500:]
    version = analyze("--version").stdout.splitlines()[0]
    assert float(measured.group(1)) <= float(documented.group(1)), \
        f"{version}: {measured.group(0)} (docs/daemon.md says {documented.group(1)})"


# -- the unit's limits, applied to hnsctl in a sandbox ---------------------------------


def confined(*argv: str) -> list[str]:
    """``argv`` with the unit's bounding set, NoNewPrivileges and MDWE."""
    (caps,) = values("CapabilityBoundingSet")
    bounding = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps.split())])
    return ["setpriv", f"--bounding-set={bounding}", "--no-new-privs", "--",
            sys.executable, "-c", MDWE, *argv]


@pytest.fixture
def limited(hns_sandbox: Sandbox) -> Iterator[tuple[Sandbox, list[str]]]:
    for tool in ("setpriv", "socat"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    yield hns_sandbox, confined(*hns_sandbox.hnsctl_argv())


def run(argv: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, (args, done.stderr)
    return done


def test_restore_and_the_daemon_work_within_the_unit_s_limits(
        limited: tuple[Sandbox, list[str]]) -> None:
    sandbox, hnsctl = limited
    run(hnsctl, "network", "create", "n1", "--type", "nat")
    vm = json.loads(run(hnsctl, "vm", "create", "v1", "--network", "n1", "--json").stdout)
    netns, ip = vm["NetNs"], vm["IpAddress"]
    run(hnsctl, "netsh", "interface", "portproxy", "add", "v4tov4", "listenport=8080",
        f"connectaddress={ip}", "connectport=80")
    subprocess.run(["ip", "netns", "del", netns], check=True)      # as a reboot leaves it
    run(hnsctl, "restore")                                          # ExecStartPre
    assert netns_mounted(netns)
    inside = Peer(netns)
    daemon = subprocess.Popen([*hnsctl, "daemon"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        inside.popen(["socat", "TCP-LISTEN:80,reuseaddr,fork", "SYSTEM:echo vm-answer"])

        def listening() -> bool:         # the proxy, and the DNS proxy (SO_BINDTODEVICE)
            status = json.loads(sandbox.hnsctl("--json", "status").stdout or "{}")
            served = [*status.get("Relays", []), *status.get("Dns", [])]
            return len(served) == 2 and all(r["State"] == "listening" for r in served)
        wait_for(listening, "the daemon's portproxy and DNS proxy", attempts=400)

        def answered() -> bool:
            with sandbox.outside.socket() as sock:
                sock.settimeout(5)
                try:
                    sock.connect((sandbox.uplink_ip, 8080))
                    return sock.recv(64) == b"vm-answer\n"
                except OSError:
                    return False
        wait_for(answered, "an answer through the relay", attempts=100, interval=0.1)
        inside.stop_processes()
        subprocess.run(["ip", "netns", "del", netns], check=True)  # the daemon heals it
        wait_for(lambda: netns_mounted(netns), "the daemon to make the namespace again",
                 attempts=400)
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=30)
        assert daemon.returncode == 0, err
        assert f"healed vm v1: namespace {netns} was gone" in err, err
    finally:
        inside.stop_processes()
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()


def test_another_user_s_process_in_a_vm_is_seen_and_killed_within_the_limits(
        limited: tuple[Sandbox, list[str]]) -> None:
    """CAP_SYS_PTRACE: /proc/PID/ns/net of another user's process (the keeper's idle
    check); CAP_KILL: powering the VM off kills it."""
    _, hnsctl = limited
    run(hnsctl, "network", "create", "n1", "--type", "nat")
    netns = json.loads(run(hnsctl, "vm", "create", "v1", "--network", "n1",
                           "--json").stdout)["NetNs"]
    inside = Peer(netns)
    try:
        nobody = inside.popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               "sleep", "60"])
        wait_for(lambda: Path(f"/proc/{nobody.pid}/ns/net").exists(), "the process")
        count = (f"from hns.daemon.keeper import processes_in; "
                 f"print(processes_in([{netns!r}])[{netns!r}])")
        assert run(confined(sys.executable, "-c", count)).stdout.strip() == "1"
        run(hnsctl, "vm", "delete", "v1")
        assert nobody.wait(timeout=10) == -signal.SIGKILL
    finally:
        inside.stop_processes()


def test_a_namespace_named_inside_a_service_mount_namespace_is_lost_to_the_host(
        hns_sandbox: Sandbox) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    name = f"{hns_sandbox.host_netns}-unit"
    code = f"from hns.netns import create_netns; create_netns({name!r})"
    try:
        # what ProtectSystem=, PrivateTmp= and the like give a service: its own mount
        # namespace, a slave of the host's
        subprocess.run(["unshare", "--mount", "--propagation", "slave", sys.executable,
                        "-c", code], check=True, timeout=60)
        assert not netns_mounted(name)
    finally:
        delete_netns(name)
