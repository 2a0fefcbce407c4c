"""The daemon serving static port proxies, with real clients from the outside network."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
from typing import Any

from helpers.nsutil import (
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
    wait_for(lambda: daemon.relay("v4tov4 tcp")["Path"] == "kernel", "the kernel path")
    v4 = curl(hns_sandbox.outside, f"http://{hns_sandbox.uplink_ip}:8080/")
    assert v4.returncode == 0, v4.stderr
    assert v4.stdout.strip() == hns_sandbox.outside_ip  # the kernel keeps the client
    v6 = curl(hns_sandbox.outside, f"http://[{hns_sandbox.uplink_ip6}]:8080/")
    assert v6.returncode == 0, v6.stderr
    assert v6.stdout.strip() == nat_vm.gateway  # the relay connects from the host
    assert daemon.relay("v6tov4 tcp")["Accepted"] >= 1
    assert daemon.relay("v6tov4 tcp")["Path"] == "relay"


def test_udp_proxies(hns_sandbox: Sandbox, nat_vm: SandboxVm, daemon: DaemonProc) -> None:
    serve_udp_peer_echo(nat_vm, 5353)
    proxy(hns_sandbox, "add", "v4tov4", "listenport=5353", f"connectaddress={nat_vm.ip}",
          "protocol=udp")
    proxy(hns_sandbox, "add", "v6tov4", "listenport=5353", f"connectaddress={nat_vm.ip}",
          "protocol=udp")
    wait_for(lambda: daemon.relay("v6tov4 udp")["State"] == "listening", "the proxies")
    wait_for(lambda: daemon.relay("v4tov4 udp")["Path"] == "kernel", "the kernel path")
    assert udp_ask(hns_sandbox.outside, hns_sandbox.uplink_ip, 5353).split(":")[0] \
        == hns_sandbox.outside_ip
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
    proxy(hns_sandbox, "add", "v4tov4", "listenport=7000", f"connectaddress={nat_vm.ip}",
          "mode=relay")
    proxy(hns_sandbox, "add", "v4tov4", "listenport=7001", f"connectaddress={nat_vm.ip}",
          "mode=relay")
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
          "connectport=443", "mode=relay")
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
    proxy(hns_sandbox, "add", "v4tov4", "listenport=6000", f"connectaddress={nat_vm.ip}",
          "mode=relay")
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


# -- one daemon per state directory, signals ------------------------------------------


def start_daemon(sandbox: Sandbox) -> subprocess.Popen[str]:
    return subprocess.Popen([*sandbox.hnsctl_argv(), "daemon"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def served_by(sandbox: Sandbox) -> int | None:
    result = sandbox.hnsctl("--json", "status")
    answer = json.loads(result.stdout) if result.returncode == 0 else {}
    return answer.get("Pid") if answer.get("Running") else None


def gave_way(proc: subprocess.Popen[str], winner: int) -> None:
    """``proc`` exited 1 with one line naming ``winner``, no traceback."""
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert len(err.splitlines()) == 1 and f"(pid {winner})" in err, err
    assert err.startswith("hnsctl: error: a daemon already serves")


def race_two_daemons(sandbox: Sandbox) -> None:
    procs = [start_daemon(sandbox), start_daemon(sandbox)]
    try:
        wait_for(lambda: any(p.poll() is not None for p in procs), "one daemon to give way",
                 attempts=1200)
        loser, winner = procs if procs[0].poll() is not None else procs[::-1]
        gave_way(loser, winner.pid)
        wait_for(lambda: served_by(sandbox) == winner.pid, "the other to serve",
                 attempts=1200)
        assert winner.poll() is None
        later = start_daemon(sandbox)            # one started once the first serves
        gave_way(later, winner.pid)
        assert served_by(sandbox) == winner.pid
        winner.send_signal(signal.SIGTERM)
        assert winner.wait(timeout=30) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def test_two_daemons_started_at_once_exactly_one_serves(hns_sandbox: Sandbox) -> None:
    for _ in range(4):
        race_two_daemons(hns_sandbox)


def test_sighup_reloads_and_the_daemon_keeps_serving(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, daemon: DaemonProc) -> None:
    assert daemon.proc is not None
    serve_http_peer_echo(nat_vm, 80)
    proxy(hns_sandbox, "add", "v4tov4", "listenport=8080", f"connectaddress={nat_vm.ip}",
          "connectport=80")
    wait_for(lambda: daemon.relay("8080")["State"] == "listening", "the proxy")
    for _ in range(2):
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: daemon.status()["Running"] is True, "the daemon after SIGHUP")
    assert daemon.proc.poll() is None and daemon.status()["Pid"] == daemon.proc.pid
    assert os.path.exists(os.path.join(hns_sandbox.state_dir, "daemon.sock"))
    result = curl(hns_sandbox.outside, f"http://{hns_sandbox.uplink_ip}:8080/")
    # the kernel path, still there: the VM sees the client
    assert result.returncode == 0 and result.stdout.strip() == hns_sandbox.outside_ip
    daemon.proc.send_signal(signal.SIGTERM)
    _, err = daemon.proc.communicate(timeout=30)
    assert daemon.proc.returncode == 0
    assert err.count("SIGHUP: reading the settings and the state again") == 2, err


# -- loops, idle timeout, connection cap ----------------------------------------------


def test_a_proxy_that_would_loop_is_refused_and_changes_nothing(hns_sandbox: Sandbox) -> None:
    up = hns_sandbox.uplink_ip
    proxy(hns_sandbox, "add", "v4tov4", "listenport=8080", "connectport=8081")
    before = hns_sandbox.hnsctl("--json", "portproxy", "show", "all").stdout
    for words in (["add", "v4tov4", "listenport=9000"],                  # netsh's defaults
                  ["add", "v4tov4", "listenport=9000", f"connectaddress={up}"],
                  ["add", "v4tov4", "listenport=9000", f"listenaddress={up}",
                   f"connectaddress={up}"],
                  ["add", "v6tov6", "listenport=9000"],
                  ["add", "v6tov6", "listenport=9000",
                   f"connectaddress={hns_sandbox.uplink_ip6}"],
                  ["add", "v4tov4", "listenport=8081", f"connectaddress={up}",
                   "connectport=8080"],                                  # through 8080
                  ["set", "v4tov4", "listenport=8080"]):
        result = hns_sandbox.hnsctl("portproxy", *words)
        assert result.returncode == 2, (words, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and "a loop" in result.stderr
    assert hns_sandbox.hnsctl("--json", "portproxy", "show", "all").stdout == before
    proxy(hns_sandbox, "add", "v4tov4", "listenport=8081", "connectaddress=192.0.2.10")


def test_a_loop_made_at_run_time_is_cut_and_logged(hns_sandbox: Sandbox,
                                                  daemon: DaemonProc) -> None:
    far = "10.99.0.1"    # not an address of the host yet: the proxies are accepted
    proxy(hns_sandbox, "add", "v4tov4", "listenport=8091", f"connectaddress={far}",
          "connectport=8092")
    proxy(hns_sandbox, "add", "v4tov4", "listenport=8092", f"connectaddress={far}",
          "connectport=8091")
    proxy(hns_sandbox, "add", "v4tov4", "listenport=8093", f"connectaddress={far}")
    hns_sandbox.host.run(["ip", "addr", "add", f"{far}/32", "dev", "lo"], check=True)
    wait_for(lambda: daemon.relay(":8093")["State"] == "listening", "the proxies")
    for port in (8091, 8093):
        assert curl(hns_sandbox.host, f"http://127.0.0.1:{port}/").returncode != 0
        wait_for(lambda p=port: daemon.relay(f":{p}")["Loops"] == 1,  # type: ignore[misc]
                 f"the loop through {port} to be cut")
        wait_for(lambda p=port: daemon.relay(f":{p}")["Connections"] == 0,  # type: ignore[misc]
                 "the chain to end")
    assert daemon.relay(":8091")["Accepted"] == 1 and daemon.relay(":8092")["Accepted"] == 1
    assert daemon.relay(":8093")["Accepted"] == 1
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    _, err = daemon.proc.communicate(timeout=30)
    assert daemon.proc.returncode == 0 and err.count("(a loop): cut") == 2, err


def test_an_idle_connection_is_closed_after_its_idle_timeout(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, daemon: DaemonProc) -> None:
    nat_vm.popen(["socat", "TCP-LISTEN:6000,reuseaddr,fork", "SYSTEM:sleep 60"])
    wait_listening(nat_vm, 6000)
    proxy(hns_sandbox, "add", "v4tov4", "listenport=6000", f"connectaddress={nat_vm.ip}",
          "idletimeout=1")
    shown = json.loads(hns_sandbox.hnsctl("--json", "portproxy", "show", "all").stdout)
    assert shown[0]["IdleTimeout"] == 1 and shown[0]["MaxConnections"] == 4096
    wait_for(lambda: daemon.relay("6000")["State"] == "listening", "the proxy")
    client = hns_sandbox.outside.popen(["socat", "-u", f"TCP:{hns_sandbox.uplink_ip}:6000",
                                        "-"])
    wait_for(lambda: client.poll() is not None, "the idle connection to be closed",
             attempts=600)
    relay = daemon.relay("6000")
    assert relay["IdleClosed"] == 1 and relay["Connections"] == 0 and relay["Errors"] == 0
    assert relay["IdleTimeout"] == 1


def test_over_its_cap_a_proxy_refuses_new_connections(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, daemon: DaemonProc) -> None:
    nat_vm.popen(["socat", "TCP-LISTEN:6000,reuseaddr,fork", "SYSTEM:sleep 60"])
    wait_listening(nat_vm, 6000)
    proxy(hns_sandbox, "add", "v4tov4", "listenport=6000", f"connectaddress={nat_vm.ip}",
          "maxconnections=2")
    wait_for(lambda: daemon.relay("6000")["State"] == "listening", "the proxy")
    clients = [hns_sandbox.outside.popen(["socat", "-u", f"TCP:{hns_sandbox.uplink_ip}:6000",
                                          "-"]) for _ in range(2)]
    wait_for(lambda: daemon.relay("6000")["Connections"] == 2, "two live connections")
    assert daemon.relay("6000")["State"] == "full: refusing new connections"
    assert "2/2" in hns_sandbox.hnsctl("status").stdout
    for _ in range(3):
        refused = hns_sandbox.outside.run(["socat", "-u",
                                           f"TCP:{hns_sandbox.uplink_ip}:6000", "-"])
        assert refused.returncode != 0 or refused.stdout == ""
    wait_for(lambda: daemon.relay("6000")["Refused"] == 3, "three refusals")
    assert daemon.relay("6000")["Connections"] == 2 and daemon.relay("6000")["Accepted"] == 2
    for c in clients:
        c.kill()
    wait_for(lambda: daemon.relay("6000")["State"] == "listening", "room again")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    _, err = daemon.proc.communicate(timeout=30)
    assert err.count("refusing new ones") == 1, err
