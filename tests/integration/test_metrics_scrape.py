"""The daemon's counters: in ``status --json`` and in Prometheus' text format, scraped
with curl in the sandbox's host namespace and read with prometheus_client's parser.  The
figures must match the traffic the test sent."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from helpers.nsutil import (
    DNS_ADDRESS,
    DNS_NAME,
    DaemonProc,
    start_dnsmasq,
    wait_for,
    wait_listening,
)
from prometheus_client.parser import text_string_to_metric_families

from hns.testing import Sandbox, SandboxVm

METRICS_PORT = 9464
PAYLOAD = bytes(range(256)) * 1200          # 307,200 bytes each way


@pytest.fixture
def daemon(hns_sandbox: Sandbox, nat_vm: SandboxVm) -> Iterator[DaemonProc]:
    hns_sandbox.set_host_resolv(f"nameserver {hns_sandbox.outside_ip}\n")
    start_dnsmasq(hns_sandbox)
    d = DaemonProc(hns_sandbox)
    d.start("--metrics", str(METRICS_PORT))
    wait_listening(hns_sandbox.host, METRICS_PORT)
    yield d
    d.kill()


def scrape(sandbox: Sandbox) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of one scrape, by (name, labels)."""
    result = sandbox.host.run(["curl", "-sS", "--max-time", "10",
                               f"http://127.0.0.1:{METRICS_PORT}/metrics"])
    assert result.returncode == 0, result.stderr
    samples = {}
    for family in text_string_to_metric_families(result.stdout):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) == 1, f"{name} {labels}: {found} in {sorted(n for n, _ in samples)}"
    return found[0]


def echo_server(vm: SandboxVm, port: int) -> threading.Thread:
    """Echo everything of one connection back, in the VM."""
    server = vm.socket()
    server.bind((vm.ip, port))
    server.listen()

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def exchange(peer: Any, address: tuple[str, int], payload: bytes) -> bytes:
    """Send ``payload``, half-close, read until the peer closes."""
    with peer.socket() as sock:
        sock.settimeout(20)
        sock.connect(address)
        sender = threading.Thread(target=lambda: (sock.sendall(payload),
                                                  sock.shutdown(socket.SHUT_WR)))
        sender.start()
        got = bytearray()
        while data := sock.recv(65536):
            got += data
        sender.join(20)
    return bytes(got)


def test_relay_bytes_and_connections_match_the_traffic(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, daemon: DaemonProc) -> None:
    server = echo_server(nat_vm, 7000)
    proxy = hns_sandbox.hnsctl("portproxy", "add", "v4tov4", "listenport=6000",
                               f"connectaddress={nat_vm.ip}", "connectport=7000",
                               "mode=relay")
    assert proxy.returncode == 0, proxy.stderr
    wait_for(lambda: daemon.relay("6000")["State"] == "listening", "the proxy")
    got = exchange(hns_sandbox.outside, (hns_sandbox.uplink_ip, 6000), PAYLOAD)
    assert got == PAYLOAD
    server.join(20)
    wait_for(lambda: daemon.relay("6000")["Connections"] == 0, "the connection to end")
    row = daemon.relay("6000")
    assert (row["BytesUp"], row["BytesDown"], row["Accepted"]) == (len(PAYLOAD),) * 2 + (1,)
    samples = scrape(hns_sandbox)
    labels = {"kind": "portproxy", "relay": row["Name"]}
    assert sample(samples, "hns_relay_bytes_total", direction="up", **labels) == len(PAYLOAD)
    assert sample(samples, "hns_relay_bytes_total", direction="down", **labels) == len(PAYLOAD)
    assert sample(samples, "hns_relay_accepted_total", **labels) == 1
    assert sample(samples, "hns_relay_connections", **labels) == 0
    assert sample(samples, "hns_daemon_up") == 1


def test_a_refused_target_counts_as_unreachable(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, daemon: DaemonProc) -> None:
    proxy = hns_sandbox.hnsctl("portproxy", "add", "v4tov4", "listenport=6001",
                               f"connectaddress={nat_vm.ip}", "connectport=7001",
                               "mode=relay")
    assert proxy.returncode == 0, proxy.stderr
    wait_for(lambda: daemon.relay("6001")["State"] == "listening", "the proxy")
    for _ in range(2):                       # nothing listens on 7001 in the VM
        result = hns_sandbox.outside.run(["curl", "-sS", "--max-time", "10",
                                          f"http://{hns_sandbox.uplink_ip}:6001/"])
        assert result.returncode != 0
    wait_for(lambda: daemon.relay("6001")["Unreachable"] == 2, "two refused connects")
    samples = scrape(hns_sandbox)
    assert sample(samples, "hns_relay_unreachable_total", kind="portproxy") == 2
    assert sample(samples, "hns_relay_errors_total", kind="portproxy") == 2


def test_localhost_forward_counts_its_bytes(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, daemon: DaemonProc) -> None:
    # on the VM's loopback: the relay's path, which counts the bytes
    nat_vm.popen(["socat", "TCP-LISTEN:8088,bind=127.0.0.1,reuseaddr,fork", "EXEC:cat"])
    wait_for(lambda: any(f["Port"] == 8088 and f["State"] == "forwarding"
                         for f in daemon.status().get("Forwards", [])), "the forward")
    got = exchange(hns_sandbox.host, ("127.0.0.1", 8088), PAYLOAD)
    assert got == PAYLOAD

    def row() -> dict[str, Any]:
        return next(f for f in daemon.status()["Forwards"]
                    if f["Port"] == 8088 and f["Listen"].startswith("127.0.0.1"))
    wait_for(lambda: row()["Connections"] == 0, "the connection to end")
    assert (row()["BytesUp"], row()["BytesDown"]) == (len(PAYLOAD), len(PAYLOAD))
    samples = scrape(hns_sandbox)
    up = sample(samples, "hns_relay_bytes_total", kind="forward", vm=nat_vm.name,
                direction="up", relay=f"{nat_vm.name} tcp 127.0.0.1:8088")
    assert up == len(PAYLOAD)


def test_dns_queries_answers_and_latency(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, daemon: DaemonProc) -> None:
    wait_for(lambda: any(e["State"] == "listening" for e in daemon.status()["Dns"]),
             "the DNS listener")
    for _ in range(3):
        result = nat_vm.run(["dig", "+short", "+tries=1", "+time=10", f"@{nat_vm.gateway}",
                             DNS_NAME])
        assert result.stdout.split() == [DNS_ADDRESS], result.stdout + result.stderr
    samples = scrape(hns_sandbox)
    assert sample(samples, "hns_dns_queries_total", network="nat") == 3
    assert sample(samples, "hns_dns_answers_total", network="nat") == 3
    assert sample(samples, "hns_dns_servfail_total", network="nat") == 0
    assert sample(samples, "hns_dns_latency_seconds_count", network="nat") == 3
    assert sample(samples, "hns_dns_latency_seconds_bucket", network="nat", le="+Inf") == 3
    assert 0 < sample(samples, "hns_dns_latency_seconds_sum", network="nat") < 30


def test_metrics_answer_on_loopback_only(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, daemon: DaemonProc) -> None:
    for peer, address in ((hns_sandbox.outside, hns_sandbox.uplink_ip),
                          (nat_vm, nat_vm.gateway)):
        result = peer.run(["curl", "-sS", "--max-time", "5",
                           f"http://{address}:{METRICS_PORT}/metrics"])
        assert result.returncode != 0 and "hns_" not in result.stdout


@pytest.mark.parametrize("value", ["abc", "70000", "127.0.0.1:", "300.1.1.1:9000",
                                   "[::1]:0"])
def test_bad_metrics_address(hns_sandbox: Sandbox, value: str) -> None:
    result = hns_sandbox.hnsctl("daemon", "--metrics", value)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--metrics" in result.stderr


def test_a_taken_metrics_port_fails_the_daemon_in_one_line(hns_sandbox: Sandbox) -> None:
    squatter = hns_sandbox.host.socket()
    squatter.bind(("127.0.0.1", METRICS_PORT))
    squatter.listen()
    with squatter:
        result = hns_sandbox.hnsctl("daemon", "--metrics", str(METRICS_PORT), timeout=30)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "cannot listen" in lines[-1] and "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(hns_sandbox.state_dir, "daemon.sock"))


def test_port_mapping_packets_and_bytes_from_the_kernel(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, daemon: DaemonProc) -> None:
    server = echo_server(nat_vm, 80)
    added = hns_sandbox.hnsctl("portmap", "add", nat_vm.name, "--protocol", "tcp",
                               "--external-port", "8080", "--internal-port", "80")
    assert added.returncode == 0, added.stderr
    got = exchange(hns_sandbox.outside, (hns_sandbox.uplink_ip, 8080), PAYLOAD)
    assert got == PAYLOAD
    server.join(20)
    [row] = daemon.status()["PortMappings"]
    assert (row["Vm"], row["ExternalPort"], row["Target"]) == (
        nat_vm.name, 8080, f"{nat_vm.ip}:80")
    # every IP packet counted once, headers included: the payload each way and at most
    # 80 bytes of IP and TCP headers per packet on top
    # a segment retransmitted on a loaded machine is counted again: up to a quarter
    # of the payload more is allowed for it (seen: 7 KB of 600 KB under a full suite)
    assert 2 * len(PAYLOAD) < row["Bytes"] <= (2 * len(PAYLOAD) + 80 * row["Packets"]
                                               + len(PAYLOAD) // 2)
    assert row["Packets"] >= 2 * len(PAYLOAD) // 65536
    samples = scrape(hns_sandbox)
    labels = {"protocol": "tcp", "external_port": "8080", "target": f"{nat_vm.ip}:80"}
    assert sample(samples, "hns_portmap_bytes_total", **labels) >= row["Bytes"]
    assert sample(samples, "hns_portmap_packets_total", **labels) >= row["Packets"]


def test_the_settings_file_turns_the_metrics_on(hns_sandbox: Sandbox, tmp_path: Any) -> None:
    config = tmp_path / "hns.conf"
    config.write_text(f"[hns]\nmetrics = {METRICS_PORT}\n")
    proc = subprocess.Popen([*hns_sandbox.hnsctl_argv(), "--config", str(config), "daemon"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(hns_sandbox.host, METRICS_PORT)
        assert sample(scrape(hns_sandbox), "hns_daemon_up") == 1
    finally:
        proc.kill()
        proc.communicate()


def test_mirrored_relay_counts_its_bytes(hns_sandbox: Sandbox) -> None:
    made = hns_sandbox.hnsctl("network", "create", "M", "--type", "mirrored")
    assert made.returncode == 0, made.stderr
    vm = hns_sandbox.vm("box", "M")
    vm.popen(["socat", "TCP-LISTEN:8090,reuseaddr,fork", "EXEC:cat"])
    wait_listening(vm, 8090)
    d = DaemonProc(hns_sandbox)
    d.start("--metrics", str(METRICS_PORT))
    try:
        def row() -> dict[str, Any] | None:
            return next((r for r in d.status().get("Mirrored", [])
                         if (r["Vm"], r["Port"], r["Family"], r["Direction"])
                         == ("box", 8090, "ipv4", "to vm") and r["State"] == "forwarding"),
                        None)
        wait_for(lambda: row() is not None, "the mirrored relay", attempts=300)
        assert exchange(hns_sandbox.host, ("127.0.0.1", 8090), PAYLOAD) == PAYLOAD
        wait_for(lambda: (row() or {}).get("BytesDown") == len(PAYLOAD), "the bytes back")
        found = row()
        assert found is not None and found["BytesUp"] == len(PAYLOAD)
        samples = scrape(hns_sandbox)
        assert sample(samples, "hns_relay_bytes_total", kind="mirrored", vm="box",
                      direction="up", relay="box tcp/ipv4 8090 to vm") == len(PAYLOAD)
    finally:
        d.kill()
