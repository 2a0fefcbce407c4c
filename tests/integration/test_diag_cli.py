"""``hnsctl diag`` on real namespaces: a healthy VM passes every step (its TCP handshake
reaches a listener in the outside namespace from the uplink's address, NATed); one thing
broken by hand at a time -- the VM's default route, the daemon, the NAT table, the
bridge's MTU, the veth's bridge, the VM's power -- fails its own step, exit 1, and the
command the hint names (``hnsctl restore``) makes every step pass again; a bad
``--target`` or an unknown VM is refused in one line.

The tests that break something run the daemon with ``--no-heal``: a healing daemon would
put back what they broke before ``diag`` looks.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from helpers.nsutil import DaemonProc, bad_input_failures, wait_for

from hns.daemon.control import request
from hns.testing import Sandbox, SandboxVm

INSIDE = ("address-route", "arp-gateway", "icmp-gateway", "dns-gateway", "tcp-target",
          "path-mtu")


def dns_listening(sandbox: Sandbox, network: str) -> bool:
    try:
        answer = request(sandbox.state_dir, "status", timeout=2.0) or {}
    except (OSError, ValueError):
        return False
    return any(e["Network"] == network and e["State"] == "listening"
               for e in answer.get("Dns", []))


@pytest.fixture
def quiet_daemon(hns_sandbox: Sandbox) -> Iterator[subprocess.Popen[str]]:
    """``hnsctl daemon --no-heal``, once its DNS proxy serves network ``nat``."""
    proc = subprocess.Popen([*hns_sandbox.hnsctl_argv(), "daemon", "--no-heal"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def ready() -> bool:
            assert proc.poll() is None, f"the daemon exited: {proc.communicate()[1]}"
            return dns_listening(hns_sandbox, "nat")
        wait_for(ready, "the daemon's DNS proxy")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.fixture
def listener(hns_sandbox: Sandbox) -> Iterator[socket.socket]:
    """A TCP listener in the outside namespace (the kernel completes handshakes)."""
    with hns_sandbox.outside.socket() as srv:
        srv.bind((hns_sandbox.outside_ip, 0))
        srv.listen(16)
        yield srv


def target(sandbox: Sandbox, srv: socket.socket) -> str:
    return f"{sandbox.outside_ip}:{srv.getsockname()[1]}"


def diag(sandbox: Sandbox, *args: str) -> tuple[int, dict[str, Any]]:
    result = sandbox.hnsctl("diag", *args, "--json")
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, dict(json.loads(result.stdout))


def by_result(report: dict[str, Any], result: str) -> set[str]:
    return {s["Name"] for s in report["Steps"] if s["Result"] == result}


def step(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(dict(s) for s in report["Steps"] if s["Name"] == name)


def restored(sandbox: Sandbox, *args: str) -> dict[str, Any]:
    """``hnsctl restore``, as the hints say, then a diag that must pass."""
    result = sandbox.hnsctl("restore")
    assert result.returncode == 0, result.stderr
    rc, report = diag(sandbox, *args)
    assert rc == 0, report["Summary"]
    return report


def test_a_healthy_vm_passes_every_step(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                        daemon: DaemonProc, listener: socket.socket) -> None:
    wait_for(lambda: dns_listening(hns_sandbox, "nat"), "the daemon's DNS proxy")
    rc, report = diag(hns_sandbox, nat_vm.name, "--target", target(hns_sandbox, listener))
    assert rc == 0 and report["Ok"] is True and report["BreaksAt"] is None, report
    assert [s["Name"] for s in report["Steps"]] == [
        "vm-netns", "address-route", "arp-gateway", "icmp-gateway", "dns-gateway",
        "tcp-target", "path-mtu", "host-nat", "daemon"]
    assert by_result(report, "pass") == {s["Name"] for s in report["Steps"]}
    assert sum(s["Seconds"] for s in report["Steps"]) < 1.0
    listener.settimeout(5)
    conn, peer = listener.accept()
    conn.close()
    assert peer[0] == hns_sandbox.uplink_ip          # masqueraded by the NAT table
    text = hns_sandbox.hnsctl("diag", nat_vm.name)
    lines = text.stdout.splitlines()
    assert text.returncode == 0 and lines[-1] == "all steps passed (1 skipped)", text.stdout
    assert text.stderr == ""
    assert sum(" PASS " in line for line in lines) == 8


def test_a_missing_default_route_fails_address_route(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, quiet_daemon: Any,
        listener: socket.socket) -> None:
    assert nat_vm.run(["ip", "route", "del", "default"]).returncode == 0
    assert nat_vm.run(["ping", "-c1", "-W1", hns_sandbox.outside_ip]).returncode != 0
    rc, report = diag(hns_sandbox, nat_vm.name, "--target", target(hns_sandbox, listener))
    assert rc == 1 and report["BreaksAt"] == "address-route", report["Summary"]
    assert by_result(report, "fail") == {"address-route", "tcp-target"}
    assert "no default route" in step(report, "address-route")["Detail"]
    assert "hnsctl restore" in step(report, "address-route")["Hint"]
    assert "tcp-target fails because of it" in report["Summary"]
    restored(hns_sandbox, nat_vm.name, "--target", target(hns_sandbox, listener))


def test_a_stopped_daemon_fails_the_daemon_and_dns_steps(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, daemon: DaemonProc) -> None:
    wait_for(lambda: dns_listening(hns_sandbox, "nat"), "the daemon's DNS proxy")
    assert diag(hns_sandbox, nat_vm.name)[0] == 0
    daemon.stop()
    dig = nat_vm.run(["dig", "+time=1", "+tries=1", f"@{nat_vm.gateway}", "example.test"])
    assert dig.returncode != 0                  # a real client finds no DNS proxy either
    rc, report = diag(hns_sandbox, nat_vm.name)
    assert rc == 1 and report["BreaksAt"] == "daemon", report["Summary"]
    assert by_result(report, "fail") == {"dns-gateway", "daemon"}
    assert "hnsctl daemon" in step(report, "daemon")["Hint"]
    assert "dns-gateway fails because of it" in report["Summary"]


def test_a_deleted_nat_table_fails_host_nat(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                            quiet_daemon: Any,
                                            listener: socket.socket) -> None:
    table = f"hns-{hns_sandbox.service.instance}"
    assert hns_sandbox.host.run(["nft", "delete", "table", "inet", table]).returncode == 0
    rc, report = diag(hns_sandbox, nat_vm.name, "--target", target(hns_sandbox, listener))
    assert rc == 1 and report["BreaksAt"] == "host-nat", report["Summary"]
    assert by_result(report, "fail") == {"host-nat", "tcp-target"}
    assert f"nft table inet {table} is gone" in step(report, "host-nat")["Detail"]
    assert "hnsctl restore" in step(report, "host-nat")["Hint"]
    restored(hns_sandbox, nat_vm.name, "--target", target(hns_sandbox, listener))


def test_a_bridge_mtu_below_the_vms_fails_path_mtu(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                                   quiet_daemon: Any) -> None:
    bridge = hns_sandbox.service.get_network("nat").bridge
    assert nat_vm.info.mtu == 1500
    lowered = hns_sandbox.host.run(["ip", "link", "set", bridge, "mtu", "1400"])
    assert lowered.returncode == 0, lowered.stderr
    rc, report = diag(hns_sandbox, nat_vm.name)
    assert rc == 1 and report["BreaksAt"] == "path-mtu", report["Summary"]
    assert by_result(report, "fail") == {"path-mtu"}
    got = step(report, "path-mtu")
    assert "came back fragmented" in got["Detail"]
    assert "the largest that came back whole: 1400 bytes" in got["Detail"]
    assert f"link set {bridge} mtu 1500" in got["Hint"]
    restored(hns_sandbox, nat_vm.name)


def test_a_veth_off_its_bridge_fails_arp_gateway(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                                 quiet_daemon: Any) -> None:
    veth = nat_vm.info.host_ifname
    assert hns_sandbox.host.run(["ip", "link", "set", veth, "nomaster"]).returncode == 0
    rc, report = diag(hns_sandbox, nat_vm.name)
    assert rc == 1 and report["BreaksAt"] == "arp-gateway", report["Summary"]
    assert by_result(report, "fail") == {"arp-gateway"}
    assert by_result(report, "skip") == {"icmp-gateway", "dns-gateway", "tcp-target",
                                         "path-mtu"}
    got = step(report, "arp-gateway")
    assert "the veth is off the bridge" in got["Detail"]     # the veth answers ARP itself
    bridge = hns_sandbox.service.get_network("nat").bridge
    assert f"link set {veth} master {bridge}" in got["Hint"]
    restored(hns_sandbox, nat_vm.name)


def test_a_stopped_vm_fails_vm_netns_and_skips_the_inside(hns_sandbox: Sandbox,
                                                          nat_vm: SandboxVm) -> None:
    assert hns_sandbox.hnsctl("vm", "stop", nat_vm.name).returncode == 0
    rc, report = diag(hns_sandbox, nat_vm.name)
    assert rc == 1 and report["BreaksAt"] == "vm-netns", report["Summary"]
    assert by_result(report, "fail") == {"vm-netns", "daemon"}     # no daemon runs
    assert by_result(report, "skip") == set(INSIDE)
    assert step(report, "vm-netns")["Hint"] == f"hnsctl vm start {nat_vm.name}"
    assert step(report, "host-nat")["Result"] == "pass"


def test_a_mirrored_vm_passes_every_step(hns_sandbox: Sandbox, daemon: DaemonProc,
                                         listener: socket.socket) -> None:
    hns_sandbox.service.create_network("m", "mirrored")
    vm = hns_sandbox.vm("mv", "m")
    wait_for(lambda: dns_listening(hns_sandbox, "m"), "the daemon's DNS proxy")
    rc, report = diag(hns_sandbox, vm.name, "--target", target(hns_sandbox, listener))
    assert rc == 0, report["Summary"]
    assert "hns-mirror" in step(report, "host-nat")["Detail"]
    assert step(report, "address-route")["Detail"].startswith(f"{vm.ip}/")


def test_bad_targets_and_unknown_vms_are_refused_in_one_line(hns_sandbox: Sandbox,
                                                             nat_vm: SandboxVm) -> None:
    bad = ["198.51.100.1", "198.51.100.1:0", "198.51.100.1:65536", "host:80", ":80",
           "2001:db8::1:80", "198.51.100.1:x"]
    failures = bad_input_failures(hns_sandbox, [
        *(("diag", nat_vm.name, "--target", t) for t in bad),
        *(("diag", nat_vm.name, "--json", "--target", t) for t in bad[:2]),
        ("diag", "nope"), ("diag", "nope", "--target", "198.51.100.1:80"), ("diag",)])
    assert failures == []
    result = hns_sandbox.hnsctl("diag", nat_vm.name, "--target", "198.51.100.1:0")
    assert result.stdout == "" and "--target" in result.stderr
