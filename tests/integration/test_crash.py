"""Crash safety, step by step: every failpoint of every create and delete (the process
SIGKILLs itself there, see :mod:`hns.failpoint`), then the documented recovery, then the
invariants: the store and the kernel agree, re-running succeeds, ``gc`` leaves nothing.
And creates racing deletes of the same VM, which must leave nothing the store does not
know and print no traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from typing import Any

import pytest

from hns.failpoint import ENV, POINTS
from hns.testing import Sandbox

WALK = [(op, step) for op, steps in POINTS.items() for step in steps]


def hnsctl(sandbox: Sandbox, *args: str, failpoint: str | None = None
           ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop(ENV, None)
    if failpoint is not None:
        env[ENV] = failpoint
    return sandbox.hnsctl(*args, env=env)


def ok(sandbox: Sandbox, *args: str) -> Any:
    result = hnsctl(sandbox, "--json", *args)
    assert result.returncode == 0, f"{args}: {result.stderr}"
    return json.loads(result.stdout) if result.stdout.strip() else None


def host_links(sandbox: Sandbox) -> dict[str, str]:
    out = sandbox.host.run(["ip", "-j", "-d", "link", "show"]).stdout
    return {link["ifname"]: link.get("ifalias", "") for link in json.loads(out)}


def our_netns(instance: str) -> set[str]:
    from hns.netns import list_netns
    return {ns for ns in list_netns() if ns.startswith(f"hns-{instance}-")}


def nft_elements(sandbox: Sandbox, instance: str) -> set[str] | None:
    """``proto . port`` keys of the port-mapping maps (None: no table)."""
    result = sandbox.host.run(["nft", "-j", "list", "table", "inet", f"hns-{instance}"])
    if result.returncode != 0:
        return None
    keys: set[str] = set()
    for item in json.loads(result.stdout)["nftables"]:
        for elem in item.get("map", {}).get("elem", []):
            key = elem[0]["concat"]
            keys.add(" . ".join(str(k) for k in key))
    return keys


def assert_consistent(sandbox: Sandbox) -> None:
    """What the store lists, the kernel has; what the kernel has of ours, the store
    lists; and gc finds nothing to do."""
    instance = sandbox.service.instance
    nets = ok(sandbox, "network", "list")
    vms = ok(sandbox, "vm", "list")
    maps = ok(sandbox, "portmap", "list")
    links = host_links(sandbox)
    for net in nets:
        assert net["Bridge"] in links, f"bridge of {net['Name']} missing"
    for vm in vms:
        assert vm["HostInterfaceName"] in links, f"veth of {vm['Name']} missing"
        addr = subprocess.run(["ip", "-n", vm["NetNs"], "-j", "addr", "show", "eth0"],
                              capture_output=True, text=True, check=False)
        assert vm["IpAddress"] in addr.stdout, f"{vm['Name']}: eth0 lacks its address"
    known = {n["Bridge"] for n in nets} | {v["HostInterfaceName"] for v in vms}
    tagged = {name for name, alias in links.items() if alias.startswith("hns:")}
    assert tagged <= known, f"links the store does not know: {tagged - known}"
    assert our_netns(instance) == {v["NetNs"] for v in vms}
    elements = nft_elements(sandbox, instance)
    if nets:
        assert elements is not None, "nft table missing"
        assert len(elements) == len(maps), (elements, maps)
    else:
        assert elements is None, "nft table left without networks"
    assert ok(sandbox, "gc", "--dry-run") == []


def setup_for(sandbox: Sandbox, op: str) -> None:
    if op != "network-create":
        ok(sandbox, "network", "create", "n", "--type", "nat")
    if op in ("vm-delete", "portmap-add", "portmap-delete"):
        ok(sandbox, "vm", "create", "v", "--network", "n")
    if op in ("vm-delete", "portmap-delete"):
        ok(sandbox, "portmap", "add", "v", "--protocol", "tcp", "--external-port", "8080",
           "--internal-port", "80")


COMMANDS = {
    "network-create": ("network", "create", "n", "--type", "nat"),
    "network-delete": ("network", "delete", "n", "--force"),
    "vm-create": ("vm", "create", "v", "--network", "n"),
    "vm-delete": ("vm", "delete", "v"),
    "portmap-add": ("portmap", "add", "v", "--protocol", "tcp", "--external-port", "8080",
                    "--internal-port", "80"),
    "portmap-delete": ("portmap", "delete", "v", "--protocol", "tcp", "--external-port",
                       "8080"),
}


def kill_at(sandbox: Sandbox, op: str, step: str) -> None:
    setup_for(sandbox, op)
    result = hnsctl(sandbox, *COMMANDS[op], failpoint=f"{op}:{step}")
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr)


@pytest.mark.parametrize(("op", "step"), WALK, ids=[f"{o}:{s}" for o, s in WALK])
def test_killed_then_run_again(hns_sandbox: Sandbox, op: str, step: str) -> None:
    kill_at(hns_sandbox, op, step)
    again = hnsctl(hns_sandbox, *COMMANDS[op])
    assert again.returncode == 0, again.stderr
    assert "Traceback" not in again.stderr
    assert_consistent(hns_sandbox)
    if op.endswith("create") or op.endswith("add"):   # and it did what it was asked
        assert ok(hns_sandbox, *{"network-create": ("network", "list"),
                                 "vm-create": ("vm", "list"),
                                 "portmap-add": ("portmap", "list")}[op])


@pytest.mark.parametrize(("op", "step"), WALK, ids=[f"{o}:{s}" for o, s in WALK])
def test_killed_then_gc(hns_sandbox: Sandbox, op: str, step: str) -> None:
    """No re-run: gc alone takes away what the killed command left (a create rolled
    back, a delete finished), and the store and the kernel agree."""
    kill_at(hns_sandbox, op, step)
    removed = ok(hns_sandbox, "gc")
    assert all("Traceback" not in line for line in removed)
    assert_consistent(hns_sandbox)


def test_a_killed_delete_hides_its_mappings_at_once(hns_sandbox: Sandbox) -> None:
    kill_at(hns_sandbox, "vm-delete", "after-nft")
    assert ok(hns_sandbox, "portmap", "list") == []
    assert ok(hns_sandbox, "vm", "list") == []
    # a create of the same name finishes the delete first, then creates
    ok(hns_sandbox, "vm", "create", "v", "--network", "n")
    assert_consistent(hns_sandbox)


def test_creates_racing_deletes_leave_nothing_unknown(hns_sandbox: Sandbox) -> None:
    ok(hns_sandbox, "network", "create", "n", "--type", "nat")
    argv = hns_sandbox.hnsctl_argv()
    problems: list[str] = []
    for _ in range(50):
        create = subprocess.Popen([*argv, "vm", "create", "x", "--network", "n"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        delete = subprocess.Popen([*argv, "vm", "delete", "x"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for proc in (create, delete):
            _, err = proc.communicate(timeout=120)
            exists = proc.returncode == 2 and "already exists" in err   # x was there
            if (proc.returncode != 0 and not exists) or "Traceback" in err:
                problems.append(f"{proc.args[-3:]}: {proc.returncode} {err.strip()}")
        assert_consistent(hns_sandbox)
    assert problems == []
    ok(hns_sandbox, "vm", "delete", "x")
    assert_consistent(hns_sandbox)
