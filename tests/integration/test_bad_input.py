"""Bad input: exit 2, one line on stderr, nothing changed in the state or the kernel.
A failure half way: exit 1, nothing half-made left, the state unchanged.

The corpus: ``BAD`` (hand-written), ``GENERATED`` (every number field with every bad
number, every name field on create and delete with every bad name, every address field
with bad addresses, ...) and the state-dir and host-namespace cases of
:func:`test_bad_state_dirs_and_host_namespaces`, which need the sandbox's paths.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from helpers.nsutil import bad_input_failures, full_snapshot, populate, snapshot

from hns.testing import Sandbox

BAD = [
    ("network", "create", "bad name!", "--type", "nat"),
    ("network", "create", "x" * 33, "--type", "nat"),
    ("network", "create", "_x", "--type", "nat"),
    ("network", "create", "n2", "--type", "bridge"),
    ("network", "create", "n2"),
    ("network", "create", "n2", "--type", "nat", "--subnet", "10.50.0.0/33"),
    ("network", "create", "n2", "--type", "nat", "--subnet", "10.50.0.1/24"),
    ("network", "create", "n2", "--type", "nat", "--subnet", "8.8.8.0/24"),
    ("network", "create", "n2", "--type", "nat", "--subnet", "fd00::/64"),
    ("network", "create", "n2", "--type", "nat", "--subnet", "10.42.0.0/16"),
    ("network", "create", "n2", "--type", "nat", "--subnet", "10.99.0.0/16"),
    ("network", "create", "n2", "--type", "nat", "--subnet", "10.50.0.0/24",
     "--gateway", "10.51.0.1"),
    ("network", "create", "n2", "--type", "nat", "--subnet", "10.50.0.0/24",
     "--gateway", "10.50.0.255"),
    ("network", "create", "n2", "--type", "nat", "--gateway", "10.50.0.1"),
    ("network", "create", "n2", "--type", "nat", "--mtu", "99"),
    ("network", "create", "n2", "--type", "nat", "--mtu", "big"),
    ("network", "create", "n", "--type", "nat"),
    ("network", "show", "nope"),
    ("network", "delete", "n"),
    ("network", "frobnicate"),
    ("vm", "create", "v", "--network", "n"),
    ("vm", "create", "v2", "--network", "nope"),
    ("vm", "create", "v2"),
    ("vm", "create", "v 2", "--network", "n"),
    ("vm", "create", "v2", "--network", "n", "--ip", "10.42.0.10"),
    ("vm", "create", "v2", "--network", "n", "--ip", "10.43.0.5"),
    ("vm", "create", "v2", "--network", "n", "--ip", "10.42.0.1"),
    ("vm", "create", "v2", "--network", "n", "--ip", "10.42.0.255"),
    ("vm", "create", "v2", "--network", "n", "--ip", "10.42.0"),
    ("vm", "create", "v2", "--network", "n", "--mac", "00:15:5d:zz:00:01"),
    ("vm", "create", "v2", "--network", "n", "--mac", "01:00:5e:00:00:01"),
    ("vm", "create", "v2", "--network", "n", "--mac", "00:15:5d:00:00:10"),
    ("vm", "show", "nope"),
    ("vm", "exec", "nope", "--", "true"),
    ("vm", "exec", "v"),
    ("vm", "list", "--network", "nope"),
    ("--host-netns", "no-such-namespace-here", "network", "list"),
    ("frobnicate",),
]


# Numbers that are not numbers 1-65535 in ASCII digits (int() and str.isdigit() take most
# of them): other scripts' digits, superscripts, fullwidth, mathematical digits, signs,
# spaces, hex, floats, underscores, huge ones.
BAD_NUMBERS = ["", "-", "-1", "0", "0x50", "1e3", "8.0", "+80", "8_0", "\u0668\u0660",
               "\u0661\u0665\u0660\u0660", "²", "\uff18\uff10", "\u096e\u0966",
               "\U0001d7d6\U0001d7ce", "65536", "99999999999999999999999", "9" * 5000,
               "nan", "½"]
SPACED = [" {}", "{} ", "{}\n", "{}\t", "{}\u3000"]  # netsh strips its words: not there
BAD_NAMES = ["", "-", "bad name!", "x" * 33, "_x", ".x", "../x", "a/b", "a\nb", "\u00fc",
             "\u0661", "a" * 5000, "n\t", "\u200bn"]
BAD_ADDRESSES = ["", "-", "10.42.0", "10.42.0.256", "\u0661\u0660.42.0.20", "::1",
                 "fe80::1%eth0", "10.42.0.20/24", " 10.42.0.20", "a" * 300, "0x0a2a0014"]
BAD_MACS = ["", "zz", "00:15:5d:00:00", "00:15:5d:00:00:01:02", "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00", "00:15-5d:00:00:01",
            "\u0660\u0660:15:5d:00:00:01", "00155d000001"]
BAD_SWITCHES = ["", "maybe", "\u0661", "\u3000on", "onn", "2", "-"]
BAD_CIDRS = ["", "-", "10.50.0.0/33", "10.50.0.1/24", "8.8.8.0/24", "fd00::/64",
             "10.50.0.0/\u0662\u0664", "10.50.0.0/31", "10.42.0.0/24", "10.99.0.0/16",
             "\u0661\u0660.50.0.0/24", "10.50.0.0/24/24", "10.50.0.0 /24"]
BAD_PROTOCOLS = ["", "sctp", "\u0666", "tcp6", "-", "icmp"]
NET = ("network", "create", "n2", "--type", "nat")
MIRRORED = ("network", "create", "m2", "--type", "mirrored")
VM = ("vm", "create", "v2", "--network", "n")
MAP = ("portmap", "add", "v", "--protocol", "tcp")
UNMAP = ("portmap", "delete", "v", "--protocol", "tcp")
PROXY = ("portproxy", "add", "v4tov4")


def _generated() -> Iterator[tuple[str, ...]]:
    for bad in BAD_NUMBERS:
        yield (*NET, "--mtu", bad)
        yield (*MAP, "--external-port", bad, "--internal-port", "80")
        yield (*MAP, "--external-port", "8081", "--internal-port", bad)
        yield (*UNMAP, "--external-port", bad)
        for word in ("listenport", "connectport"):
            yield (*PROXY, "listenport=9001", f"{word}={bad}")
        yield ("portproxy", "delete", "v4tov4", f"listenport={bad}")
        if bad:  # an empty list is a valid list
            yield (*MIRRORED, "--ignored-ports", bad)
            yield (*MIRRORED, "--ignored-ports", f"22,{bad}")
    for spaced in SPACED:
        yield (*NET, "--mtu", spaced.format(1500))
        yield (*MAP, "--external-port", spaced.format(8081), "--internal-port", "80")
    for bad in BAD_NAMES:
        yield ("network", "create", bad, "--type", "nat")
        yield ("vm", "create", bad, "--network", "n")
        yield ("vm", "create", "v2", "--network", bad)
        yield ("vm", "delete", bad)
        yield ("network", "delete", bad)
        yield ("portmap", "delete", bad, "--protocol", "tcp", "--external-port", "8080")
        yield ("portmap", "add", bad, "--protocol", "tcp", "--external-port", "8081",
               "--internal-port", "80")
    for bad in BAD_ADDRESSES:
        yield (*VM, "--ip", bad)
        yield (*MAP, "--external-port", "8081", "--internal-port", "80", "--host-address", bad)
        if bad == bad.strip():
            yield (*PROXY, "listenport=9001", f"listenaddress={bad}")
            yield (*PROXY, "listenport=9001", f"connectaddress={bad}")
    for bad in BAD_MACS:
        yield (*VM, "--mac", bad)
    for bad in BAD_SWITCHES:
        yield (*NET, "--localhost-forwarding", bad)
        yield (*NET, "--firewall", bad)
        yield (*MIRRORED, "--host-address-loopback", bad)
    for bad in BAD_CIDRS:
        yield (*NET, "--subnet", bad)
    for bad in BAD_PROTOCOLS:
        yield ("portmap", "add", "v", "--protocol", bad, "--external-port", "8081",
               "--internal-port", "80")
        yield (*PROXY, "listenport=9001", f"protocol={bad}")
    for kind, words in itertools.product(["v4tov5", "", "v4", "\u0664to\u0664"],
                                         [("listenport=9001",)]):
        yield ("portproxy", "add", kind, *words)


GENERATED = list(_generated())
# What the state of `populated` refuses: taken names, ports and sockets, the wrong owner.
REFUSED = [
    (*MAP, "--external-port", "8080", "--internal-port", "81"),
    ("portmap", "delete", "v2", "--protocol", "tcp", "--external-port", "8080"),
    (*PROXY, "listenport=9000"),
    ("portproxy", "add", "v4tov4", "listenport=9000", "listenaddress=127.0.0.1"),
    ("portproxy", "show", "v4tov7"),
    ("vm", "list", "--network", ""),
    ("portmap", "list", "nope"),
    ("network", "create", "m2", "--type", "mirrored", "--subnet", "10.50.0.0/24"),
    ("network", "create", "n2", "--type", "nat", "--ignored-ports", "22"),
    ("up", "--networking-mode", "bridge"),
    ("up", "--networking-mode", "\u0661"),
    ("gc", "--dry-run", "extra"),
    ("daemon", "extra"),
    ("status", "extra"),
]


@pytest.fixture
def populated(hns_sandbox: Sandbox) -> Sandbox:
    hns_sandbox.host.run(["ip", "link", "add", "lan0", "type", "veth", "peer", "lan0p"],
                         check=True)
    hns_sandbox.host.run(["ip", "addr", "add", "10.99.0.1/24", "dev", "lan0"], check=True)
    return populate(hns_sandbox)


def corpus_size() -> int:
    """The bad inputs this module holds (the state-dir and namespace cases included)."""
    return (len(BAD) + len(GENERATED) + len(REFUSED)
            + len(STATE_DIR_CASES) * len(STATE_DIR_COMMANDS)
            + (len(STATE_DIR_CASES) - 1) * len(STATE_DIR_MAKERS)
            + len(HOST_NETNS_CASES) * len(HOST_NETNS_COMMANDS))


def test_bad_input_exits_2_with_one_line_and_changes_nothing(populated: Sandbox) -> None:
    before = full_snapshot(populated)
    assert bad_input_failures(populated, BAD) == []
    assert full_snapshot(populated) == before


def test_generated_bad_input_exits_2_and_changes_nothing(populated: Sandbox) -> None:
    before = full_snapshot(populated)
    assert len(GENERATED) + len(REFUSED) >= 300
    assert bad_input_failures(populated, GENERATED + REFUSED) == []
    assert full_snapshot(populated) == before


STATE_DIR_CASES = ["empty", "file", "under-a-file", "dangling-link", "missing", "too-long"]
STATE_DIR_COMMANDS = [
    ("network", "list"), ("--json", "network", "list"), ("network", "show", "n"),
    ("vm", "list"), ("vm", "show", "v"), ("vm", "delete", "v"), ("network", "delete", "n"),
    ("portmap", "list"), ("portproxy", "show"), ("status",), ("gc", "--dry-run"), ("gc",),
    ("down",), ("portproxy", "reset"),
    ("portmap", "delete", "v", "--protocol", "tcp", "--external-port", "8080"),
    ("vm", "exec", "v", "--", "true"),
]
STATE_DIR_MAKERS = [NET, VM, ("up",), ("restore",)]  # they would make a missing one
HOST_NETNS_CASES = ["", "..", "a/b", "missing", "file", "dir", "uts-mount"]
HOST_NETNS_COMMANDS = [("network", "list"), NET, ("vm", "delete", "v"), ("daemon",)]


def _state_dirs(sandbox: Sandbox, tmp: str) -> dict[str, str]:
    with open(os.path.join(tmp, "file"), "w"):
        pass
    os.symlink(os.path.join(tmp, "gone"), os.path.join(tmp, "dangling"))
    return {"empty": "", "file": os.path.join(tmp, "file"),
            "under-a-file": os.path.join(tmp, "file", "state"),
            "dangling-link": os.path.join(tmp, "dangling"),
            "missing": os.path.join(tmp, "missing"), "too-long": os.path.join(tmp, "x" * 300)}


@pytest.fixture
def fake_namespaces() -> Iterator[dict[str, str]]:
    """Names under /run/netns that are not mounted network namespaces; removed after."""
    tag = uuid.uuid4().hex[:8]
    names = {k: f"hns-fake-{tag}-{k}" for k in ("file", "dir", "uts-mount")}
    paths = {k: os.path.join("/run/netns", n) for k, n in names.items()}
    os.makedirs("/run/netns", exist_ok=True)
    open(paths["file"], "w").close()
    os.mkdir(paths["dir"])
    open(paths["uts-mount"], "w").close()
    subprocess.run(["mount", "--bind", "/proc/self/ns/uts", paths["uts-mount"]], check=True)
    try:
        yield {"": "", "..": "..", "a/b": "a/b", "missing": f"hns-fake-{tag}-missing", **names}
    finally:
        subprocess.run(["umount", paths["uts-mount"]], check=False)
        os.unlink(paths["uts-mount"])
        os.unlink(paths["file"])
        os.rmdir(paths["dir"])


def test_bad_state_dirs_and_host_namespaces(populated: Sandbox, tmp_path: Any,
                                            fake_namespaces: dict[str, str]) -> None:
    """A state dir that is empty, not a directory, or (for a command that only reads or
    removes) missing; a host namespace that is not a mounted network namespace."""
    dirs = _state_dirs(populated, str(tmp_path))
    assert sorted(dirs) == sorted(STATE_DIR_CASES)
    argvs = [("--state-dir", path, *cmd) for path in dirs.values() for cmd in STATE_DIR_COMMANDS]
    argvs += [("--state-dir", path, *cmd) for case, path in dirs.items() if case != "missing"
              for cmd in STATE_DIR_MAKERS]
    argvs += [("--host-netns", fake_namespaces[case], *cmd) for case in HOST_NETNS_CASES
              for cmd in HOST_NETNS_COMMANDS]
    assert len(argvs) == corpus_size() - len(BAD) - len(GENERATED) - len(REFUSED)
    before = full_snapshot(populated)
    assert bad_input_failures(populated, argvs) == []
    assert full_snapshot(populated) == before
    assert not os.path.exists(dirs["missing"])
    assert sorted(os.listdir(tmp_path)) == ["dangling", "file"]


def test_kernel_failure_half_way_is_rolled_back(populated: Sandbox) -> None:
    net = populated.service.get_network("n")
    populated.host.run(["ip", "link", "del", net.bridge], check=True)  # the kernel lost it
    before = snapshot(populated)
    result = populated.hnsctl("vm", "create", "v2", "--network", "n")
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and "bridge" in result.stderr
    assert snapshot(populated) == before  # no netns, no veth, no state row
    ns = f"hns-{populated.service.instance}-v2"
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                    text=True).stdout
    populated.hnsctl("restore", check=True)
    assert populated.hnsctl("vm", "create", "v2", "--network", "n").returncode == 0


def test_twenty_concurrent_creates_get_distinct_addresses(hns_sandbox: Sandbox) -> None:
    hns_sandbox.service.create_network("n", "nat")
    procs = [subprocess.Popen(
        [*hns_sandbox.hnsctl_argv(), "--json", "vm", "create", f"c{i}", "--network", "n"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(20)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in results] == [0] * 20, [err for _, _, err in results]
    vms = hns_sandbox.service.list_vms()
    assert len(vms) == 20
    assert len({v.ip for v in vms}) == 20 and len({v.mac for v in vms}) == 20
    last = vms[-1]
    ping = subprocess.run(["ip", "netns", "exec", last.netns, "ping", "-c1", "-W5",
                           str(vms[0].ip)], capture_output=True, text=True)
    assert ping.returncode == 0, ping.stdout
