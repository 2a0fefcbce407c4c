"""What a failing test's report carries: ``hns diagnostics`` (hns.diag per VM, the
status, the nft ruleset), ``--hns-capture`` pcaps read back with tcpdump, and
``--hns-keep-on-failure`` sandboxes entered, read and then removed.

Each run is a pytest of its own (pytester) with a prefix and an owner-record directory of
its own: the checks of what is left look only at its names.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hns.netns import list_netns, netns_exists
from hns.testing import remove_stale_sandboxes

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

FAILING = """
def test_fails(hns_sandbox, nat_vm):
    ping = nat_vm.run(["ping", "-c1", "-W5", hns_sandbox.outside_ip])
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert False, "failed on purpose"


def test_passes(hns_sandbox, nat_vm):
    assert nat_vm.run(["ping", "-c1", "-W5", nat_vm.gateway]).returncode == 0
"""


@pytest.fixture
def run(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> Iterator[tuple[str, str]]:
    """A prefix and a records directory for the pytester runs of one test; whatever
    they left is removed afterwards, and must then be gone."""
    prefix = f"t{secrets.token_hex(3)}-"
    records = str(tmp_path / "records")
    monkeypatch.setenv("HNS_SANDBOX_RECORDS", records)
    pytester.makepyfile(test_user=FAILING)
    try:
        yield prefix, records
    finally:
        remove_stale_sandboxes(prefix=prefix, directory=records)
        assert not [ns for ns in list_netns() if ns.startswith(prefix)]


def section(output: str, title: str) -> str:
    """The text of the report section ``title`` (up to the next ``----``/``====`` bar)."""
    bar = r"^[-=_]{3,} [^\n]* [-=_]{3,}$"
    match = re.search(rf"^-+ {re.escape(title)} -+\n(.*?)(?={bar}|\Z)", output, re.M | re.S)
    assert match, f"no section {title!r} in:\n{output}"
    return match.group(1)


def test_failure_carries_diagnostics_and_an_on_failure_pcap(
        pytester: pytest.Pytester, run: tuple[str, str]) -> None:
    prefix, _ = run
    result = pytester.runpytest_subprocess(f"--hns-prefix={prefix}", "--hns-capture=on-failure",
                                           "-p", "no:cacheprovider", timeout=300)
    out = result.stdout.str()
    assert result.ret == 1, out
    result.assert_outcomes(failed=1, passed=1)
    diag = section(out, "hns diagnostics")
    assert re.search(rf"^sandbox {prefix}\w+-host$", diag, re.M), diag
    vm_part = diag.split("-------- vm vm0: hns.diag\n", 1)[1]
    assert not vm_part.startswith("diagnose("), vm_part      # hns.diag's text, no error
    assert "icmp-gateway" in vm_part
    assert "-------- hnsctl status (no daemon)\ndaemon: not running" in diag
    nft = diag.split("nft list ruleset\n", 1)[1]
    assert re.search(r"^table inet hns-\w+ \{", nft, re.M) and "masquerade" in nft

    capture = section(out, "hns capture")
    found = re.search(r"^vm vm0: (\S+\.pcap) \((\d+) packets\)", capture, re.M)
    assert found, capture
    pcap, packets = Path(found.group(1)), int(found.group(2))
    assert packets > 0
    assert pcap.name.startswith("test_fails-")
    assert [p.name for p in pcap.parent.iterdir()] == [pcap.name]   # none of the pass
    read = subprocess.run(["tcpdump", "-nr", str(pcap)], capture_output=True, text=True,
                          timeout=60)
    assert read.returncode == 0, read.stderr
    assert re.search(r"IP 172\.16\.\d+\.\d+ > 198\.51\.100\.1: ICMP echo request",
                     read.stdout), read.stdout
    assert read.stdout.count("\n") == packets
    assert "hns: packet captures" in out and str(pcap) in out.split("hns: packet captures")[1]


def test_always_keeps_every_pcap_and_never_makes_none(
        pytester: pytest.Pytester, run: tuple[str, str]) -> None:
    prefix, _ = run
    result = pytester.runpytest_subprocess(f"--hns-prefix={prefix}", "--hns-capture=always",
                                           "-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(failed=1, passed=1)
    (directory,) = pytester.path.glob("runpytest-[0-9]*/hns-capture")
    kept = sorted(directory.iterdir())
    assert [p.name.split("-")[0] for p in kept] == ["test_fails", "test_passes"]
    for path in kept:
        read = subprocess.run(["tcpdump", "-nr", str(path)], capture_output=True, text=True,
                              timeout=60)
        assert read.returncode == 0 and "ICMP echo request" in read.stdout, read
    result = pytester.runpytest_subprocess(f"--hns-prefix={prefix}", "-p", "no:cacheprovider",
                                           timeout=300)
    result.assert_outcomes(failed=1, passed=1)
    out = result.stdout.str()
    assert "hns capture" not in out and "hns diagnostics" in out
    assert [d.parent for d in pytester.path.glob("runpytest-[0-9]*/hns-capture")] == [
        directory.parent]                                # none in the second run's


def test_keep_on_failure_leaves_a_sandbox_to_enter(
        pytester: pytest.Pytester, run: tuple[str, str]) -> None:
    prefix, records = run
    result = pytester.runpytest_subprocess(f"--hns-prefix={prefix}", "--hns-keep-on-failure",
                                           "-p", "no:cacheprovider", timeout=300)
    out = result.stdout.str()
    assert result.ret == 1, out
    assert "left behind" not in out
    kept = section(out, "hns sandbox kept")
    host = re.search(rf"enter the host: +ip netns exec ({prefix}\w+-host) bash", kept)
    outside = re.search(rf"enter the outside: +ip netns exec ({prefix}\w+-out) bash", kept)
    vm = re.search(r"enter a VM: +ip netns exec (hns-\w+-vm0) bash", kept)
    state = re.search(r"state dir: (\S+)", kept)
    assert host and outside and vm and state, kept
    assert "hns: kept sandboxes" in out
    for ns in (host.group(1), outside.group(1), vm.group(1)):
        assert netns_exists(ns), ns
    assert len([ns for ns in list_netns() if ns.startswith(prefix)]) == 2  # pass's removed
    status = subprocess.run([sys.executable, "-m", "hns.cli", "--state-dir", state.group(1),
                             "--host-netns", host.group(1), "vm", "list"],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "vm0" in status.stdout, status
    inside = subprocess.run(["ip", "netns", "exec", host.group(1), "nft", "list", "tables"],
                            capture_output=True, text=True, timeout=60)
    assert re.search(r"^table inet hns-\w+$", inside.stdout, re.M), inside

    again = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "nothing",
                                          timeout=300)      # a new session keeps it
    assert "hns: kept sandboxes of ended runs: 1" in again.stdout.str()
    assert netns_exists(host.group(1))
    removed = remove_stale_sandboxes(prefix=prefix, directory=records)
    assert f"netns {host.group(1)}" in removed and f"netns {vm.group(1)}" in removed
    assert f"state dir {state.group(1)}" in removed
    for ns in (host.group(1), outside.group(1), vm.group(1)):
        assert not netns_exists(ns), ns
    assert not os.path.exists(state.group(1))
    assert not [n for n in os.listdir(records) if n.endswith(".json")]
