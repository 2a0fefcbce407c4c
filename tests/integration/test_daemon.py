"""The daemon serving static port proxies, with real clients from the outside network."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
from typing import Any

from nsutil import (
    DaemonProc,
    serve_http_peer_echo,
    serve_udp_peer_echo,
    udp_ask,
    wait_for,
    wait_listening,
)

from hns.testing import Sandbox, SandboxVm


def proxy(sandbox: Sandbox, *words: str) -> None:
    result = sandbox.hnsctl("portproxy", *words)
    assert result.returncode == 0, result.stderr


def curl(peer: Any, url: str) -> subprocess.CompletedProcess[str]:
    return peer.run(["curl", "-sS", "-g", "--max-time", "10", url])  # type: ignore[no-any-return]


def test_v4tov4_and_v6tov4_tcp(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                               daemon: DaemonProc) -> None:
    serve_http_peer_echo(nat_vm, 80)
    proxy(hns_sandbox, "add", "v4tov4", "listenport=8080", f"connectaddress={nat_vm.ip}",
          "connectport=80")
    proxy(hns_sandbox, "add", "v6tov4", "listenport=8080", f"connectaddress={nat_vm.ip}",
          "connectport=80")
    wait_for(lambda: daemon.relay("v6tov4")["State"] == "listening", "the proxies")
    for url in (f"http://{hns_sandbox.uplink_ip}:8080/",
                f"http://[{hns_sandbox.uplink_ip6}]:8080/"):
        result = curl(hns_sandbox.outside, url)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == nat_vm.gateway  # the relay connects from the host
    assert daemon.relay("v4tov4 tcp")["Accepted"] >= 1


def test_udp_proxies(hns_sandbox: Sandbox, nat_vm: SandboxVm, daemon: DaemonProc) -> None:
    serve_udp_peer_echo(nat_vm, 5353)
    proxy(hns_sandbox, "add", "v4tov4", "listenport=5353", f"connectaddress={nat_vm.ip}",
          "protocol=udp")
    proxy(hns_sandbox, "add", "v6tov4", "listenport=5353", f"connectaddress={nat_vm.ip}",
          "protocol=udp")
    wait_for(lambda: daemon.relay("v6tov4 udp")["State"] == "listening", "the proxies")
    assert udp_ask(hns_sandbox.outside, hns_sandbox.uplink_ip, 5353).split(":")[0] \
        == nat_vm.gateway
    assert udp_ask(hns_sandbox.outside, f"[{hns_sandbox.uplink_ip6}]", 5353).split(":")[0] \
        == nat_vm.gateway


def test_half_close_still_gets_the_whole_reply(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                              daemon: DaemonProc) -> None:
    # the server reads everything up to EOF, then answers with the byte count
    nat_vm.popen(["socat", "TCP-LISTEN:9000,reuseaddr,fork", "SYSTEM:wc -c"])
    wait_listening(nat_vm, 9000)
    proxy(hns_sandbox, "add", "v4tov4", "listenport=9000", f"connectaddress={nat_vm.ip}")
    wait_for(lambda: daemon.relay("9000")["State"] == "listening", "the proxy")
    payload = os.urandom(3 * 1024 * 1024)
    result = hns_sandbox.outside.run(["socat", "-t", "10", "-",
                                      f"TCP:{hns_sandbox.uplink_ip}:9000"],
                                     input=payload, text=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(len(payload)).encode()


def test_target_resetting_or_refusing_does_not_take_the_daemon_down(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, daemon: DaemonProc) -> None:
    listener = nat_vm.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((nat_vm.ip, 7000))
    listener.listen()
    proxy(hns_sandbox, "add", "v4tov4", "listenport=7000", f"connectaddress={nat_vm.ip}")
    proxy(hns_sandbox, "add", "v4tov4", "listenport=7001", f"connectaddress={nat_vm.ip}")
    wait_for(lambda: daemon.relay(":7001")["State"] == "listening", "the proxies")
    client = hns_sandbox.outside.popen(["socat", "-t", "5", "-",
                                        f"TCP:{hns_sandbox.uplink_ip}:7000"],
                                       stdin=subprocess.PIPE)
    conn, _ = listener.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()  # RST towards the relay
    assert client.wait(timeout=30) is not None
    listener.close()
    refused = curl(hns_sandbox.outside, f"http://{hns_sandbox.uplink_ip}:7001/")
    assert refused.returncode != 0  # nothing listens behind 7001
    serve_http_peer_echo(nat_vm, 7000)
    ok = curl(hns_sandbox.outside, f"http://{hns_sandbox.uplink_ip}:7000/")
    assert ok.returncode == 0 and ok.stdout.strip() == nat_vm.gateway
    assert daemon.status()["Running"] is True


def test_changes_apply_without_restart_and_restart_keeps_proxies(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, daemon: DaemonProc) -> None:
    serve_http_peer_echo(nat_vm, 80)
    url = f"http://{hns_sandbox.uplink_ip}:8080/"
    proxy(hns_sandbox, "add", "v4tov4", "listenport=8080", f"connectaddress={nat_vm.ip}",
          "connectport=80")
    wait_for(lambda: curl(hns_sandbox.outside, url).returncode == 0, "the new proxy")
    assert daemon.stop() == 0
    assert curl(hns_sandbox.outside, url).returncode != 0
    daemon.start()
    wait_for(lambda: curl(hns_sandbox.outside, url).returncode == 0, "the restored proxy")
    proxy(hns_sandbox, "delete", "v4tov4", "listenport=8080")
    wait_for(lambda: curl(hns_sandbox.outside, url).returncode != 0, "the proxy to go")
    assert daemon.status()["Relays"] == []


def test_address_in_use_is_reported_and_retried(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                               daemon: DaemonProc) -> None:
    squatter = hns_sandbox.host.popen(["socat", "TCP-LISTEN:8443,reuseaddr", "SYSTEM:true"])
    wait_listening(hns_sandbox.host, 8443)
    serve_http_peer_echo(nat_vm, 443)
    proxy(hns_sandbox, "add", "v4tov4", "listenport=8443", f"connectaddress={nat_vm.ip}",
          "connectport=443")
    wait_for(lambda: "in use" in daemon.relay("8443")["State"], "the conflict to show")
    text = hns_sandbox.hnsctl("status").stdout
    assert "Address already in use" in text
    squatter.kill()
    squatter.wait()
    wait_for(lambda: daemon.relay("8443")["State"] == "listening", "the retry")
    ok = curl(hns_sandbox.outside, f"http://{hns_sandbox.uplink_ip}:8443/")
    assert ok.returncode == 0 and ok.stdout.strip() == nat_vm.gateway


def test_status_counts_live_connections_and_guards_its_socket(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, daemon: DaemonProc) -> None:
    nat_vm.popen(["socat", "TCP-LISTEN:6000,reuseaddr,fork", "SYSTEM:sleep 60"])
    wait_listening(nat_vm, 6000)
    proxy(hns_sandbox, "add", "v4tov4", "listenport=6000", f"connectaddress={nat_vm.ip}")
    wait_for(lambda: daemon.relay("6000")["State"] == "listening", "the proxy")
    clients = [hns_sandbox.outside.popen(["socat", "-u", f"TCP:{hns_sandbox.uplink_ip}:6000",
                                          "-"]) for _ in range(3)]
    wait_for(lambda: daemon.relay("6000")["Connections"] == 3, "three live connections")
    for c in clients:
        c.kill()
    wait_for(lambda: daemon.relay("6000")["Connections"] == 0, "the connections to end")
    mode = os.stat(os.path.join(hns_sandbox.state_dir, "daemon.sock")).st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert daemon.stop() == 0
    assert not os.path.exists(os.path.join(hns_sandbox.state_dir, "daemon.sock"))
    assert json.loads(hns_sandbox.hnsctl("--json", "status").stdout)["Running"] is False


def test_bad_portproxy_words_change_nothing(hns_sandbox: Sandbox) -> None:
    proxy(hns_sandbox, "add", "v4tov4", "listenport=80", "connectaddress=10.0.0.1")
    before = hns_sandbox.hnsctl("--json", "portproxy", "show", "all").stdout
    for words in (["add", "v4tov4", "listenport=80", "connectaddress=10.0.0.2"],
                  ["add", "v4tov4", "listenport=99999"],
                  ["add", "v9tov4", "listenport=1"],
                  ["add", "v4tov4", "connectaddress=10.0.0.1"],
                  ["delete", "v4tov4"],
                  ["show", "v5"]):
        result = hns_sandbox.hnsctl("portproxy", *words)
        assert result.returncode == 2, (words, result.stderr)
        assert len(result.stderr.splitlines()) == 1
    assert hns_sandbox.hnsctl("--json", "portproxy", "show", "all").stdout == before


def test_tells_systemd_when_ready_and_when_stopping(hns_sandbox: Sandbox,
                                                   tmp_path: Any) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(path)
        notify.settimeout(60)
        env = dict(os.environ, NOTIFY_SOCKET=path)
        proc = subprocess.Popen([*hns_sandbox.hnsctl_argv(), "daemon"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert notify.recv(256) == b"READY=1"
            proc.send_signal(signal.SIGTERM)
            assert notify.recv(256) == b"STOPPING=1"
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
