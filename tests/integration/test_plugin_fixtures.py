"""The plugin's fixtures and helpers in use, the way a user's tests use them: the daemon
and a port proxy, a port mapping, a mirrored VM, wait_port and wait_until; real clients
(curl) and servers (socat).

``teardown_check`` is set up before the fixtures under test and so torn down after them:
it checks that they removed what they made.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers.nsutil import HTTP_PEER_ECHO, UDP_PEER_ECHO

from hns.testing import HnsDaemon, Sandbox, SandboxVm, wait_port, wait_until


def serve_http(peer: Any, port: int) -> None:
    """An HTTP server (socat) answering with the client's address; not waited for."""
    peer.popen(["socat", f"TCP-LISTEN:{port},reuseaddr,fork", f"SYSTEM:{HTTP_PEER_ECHO}"])


def curl(peer: Any, url: str) -> str:
    result = peer.run(["curl", "-sS", "--max-time", "10", url])
    assert result.returncode == 0, result.stderr
    return str(result.stdout.strip())


@pytest.fixture
def teardown_check(hns_sandbox: Sandbox) -> Iterator[list[Callable[[], None]]]:
    """Checks appended by a test, run after the other fixtures' teardown."""
    checks: list[Callable[[], None]] = []
    yield checks
    for check in checks:
        check()


def test_daemon_serves_a_portproxy_from_outside_to_the_vm(
        teardown_check: list[Callable[[], None]], hns_sandbox: Sandbox, nat_vm: SandboxVm,
        hns_daemon: HnsDaemon, portproxy: Callable[..., dict[str, Any]]) -> None:
    status = hns_daemon.status()
    assert status["Running"] is True and status["Pid"] == hns_daemon.proc.pid  # type: ignore
    serve_http(nat_vm, 8080)
    wait_port(nat_vm, nat_vm.ip, 8080)
    relay = portproxy(9000, nat_vm, 8080)
    assert relay["State"] == "listening"
    assert relay["Connect"] == f"{nat_vm.ip}:8080"
    # a v4tov4 proxy to a VM goes through the kernel: the VM sees the real client
    wait_until(lambda: hns_daemon.relay(relay["Name"])["Path"] == "kernel", timeout=10,
               what="the proxy's kernel path")
    assert curl(hns_sandbox.outside, f"http://{hns_sandbox.uplink_ip}:9000/") == \
        hns_sandbox.outside_ip
    # from the host's loopback the relay serves it: the VM sees the host's side of its bridge
    assert curl(hns_sandbox.host, "http://127.0.0.1:9000/") == nat_vm.gateway

    def counted() -> bool:
        now = hns_daemon.relay(relay["Name"])
        return bool(now["Accepted"] == 1 and now["Connections"] == 0 and now["BytesUp"] > 0)
    wait_until(counted, timeout=10, what="the relay to count the finished connection")

    def proxy_removed_and_daemon_stopped() -> None:
        shown = hns_sandbox.hnsctl("--json", "portproxy", "show")
        assert shown.returncode == 0 and json.loads(shown.stdout) == [], shown
        assert hns_daemon.proc is not None and hns_daemon.proc.returncode == 0
        assert json.loads(hns_sandbox.hnsctl("--json", "status").stdout)["Running"] is False
    teardown_check.append(proxy_removed_and_daemon_stopped)


def test_port_mapping_reaches_the_vm_and_goes_at_teardown(
        teardown_check: list[Callable[[], None]], hns_sandbox: Sandbox, nat_vm: SandboxVm,
        port_mapping: Callable[..., Any]) -> None:
    serve_http(nat_vm, 80)
    wait_port(nat_vm, nat_vm.ip, 80)
    mapping = port_mapping(nat_vm, 8081, 80)
    assert (mapping.vm, mapping.external_port, mapping.internal_port) == ("vm0", 8081, 80)
    assert [m.external_port for m in hns_sandbox.service.list_port_mappings()] == [8081]
    # NAT: the VM sees the outside peer's own address
    assert curl(hns_sandbox.outside, f"http://{hns_sandbox.uplink_ip}:8081/") == \
        hns_sandbox.outside_ip
    teardown_check.append(lambda: _assert_no_mappings(hns_sandbox))


def _assert_no_mappings(sandbox: Sandbox) -> None:
    assert sandbox.service.list_port_mappings() == []
    ruleset = sandbox.host.run(["nft", "list", "ruleset"]).stdout
    assert "8081" not in ruleset


def test_mirrored_vm_wears_the_host_address(hns_sandbox: Sandbox, mirrored_network: Any,
                                            mirrored_vm: SandboxVm) -> None:
    assert mirrored_network.name == "mirrored" and str(mirrored_network.type) in (
        "mirrored", "NetworkType.MIRRORED")
    assert mirrored_vm.name == "mvm0" and mirrored_vm.info.network == "mirrored"
    addrs = mirrored_vm.run(["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
    assert f"inet {hns_sandbox.uplink_ip}/24" in addrs
    serve_http(hns_sandbox.outside, 8082)
    wait_port(hns_sandbox.outside, hns_sandbox.outside_ip, 8082)
    assert curl(mirrored_vm, f"http://{hns_sandbox.outside_ip}:8082/") == \
        hns_sandbox.uplink_ip


def test_wait_port_waits_for_a_late_tcp_server(hns_sandbox: Sandbox, nat_vm: SandboxVm) -> None:
    timer = threading.Timer(0.5, serve_http, (nat_vm, 8083))
    timer.start()
    started = time.monotonic()
    wait_port(nat_vm, nat_vm.ip, 8083, timeout=20)
    timer.join()
    assert time.monotonic() - started >= 0.5
    assert curl(nat_vm, f"http://{nat_vm.ip}:8083/") == nat_vm.ip


def test_wait_port_names_what_it_waited_for(hns_sandbox: Sandbox, nat_vm: SandboxVm) -> None:
    with pytest.raises(TimeoutError) as caught:
        wait_port(nat_vm, hns_sandbox.outside_ip, 8084, timeout=0.5)
    message = str(caught.value)
    assert f"tcp {hns_sandbox.outside_ip}:8084 not reachable from netns {nat_vm.netns}" \
        in message
    assert "ECONNREFUSED" in message
    with pytest.raises(TimeoutError, match=r"udp .*ECONNREFUSED"):
        wait_port(nat_vm.netns, hns_sandbox.outside_ip, 8084, timeout=0.5, protocol="udp")


def test_wait_port_udp(hns_sandbox: Sandbox, nat_vm: SandboxVm) -> None:
    nat_vm.popen([sys.executable, "-c", UDP_PEER_ECHO, "5353", "4"])
    wait_port(nat_vm, nat_vm.ip, 5353, protocol="udp")
    with nat_vm.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(b"ping", (nat_vm.ip, 5353))
        assert sock.recv(100).decode().strip() == nat_vm.ip


def test_sandbox_and_vm_say_what_they_are(hns_sandbox: Sandbox, nat_vm: SandboxVm) -> None:
    text = repr(hns_sandbox)
    for part in (hns_sandbox.tag, hns_sandbox.host_netns, hns_sandbox.outside_netns,
                 hns_sandbox.state_dir, "vms=[vm0]"):
        assert part in text
    assert repr(nat_vm) == (f"SandboxVm('vm0', network='nat', ip={nat_vm.ip}, "
                            f"netns={nat_vm.netns!r})")
