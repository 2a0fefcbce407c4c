"""Small helpers for the integration tests: readiness polling, clients and servers,
snapshots."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from hns.daemon.config import ProxyConfig
from hns.testing import Peer, Sandbox, SandboxVm

# The server reads the request up to its blank line before answering (closing with unread
# data would reset the connection), and avoids backslashes: socat unescapes them.
HTTP_PEER_ECHO = "sed -n /^.$/q; echo HTTP/1.0 200 OK; echo; echo $SOCAT_PEERADDR"


def wait_for(predicate: Callable[[], bool], what: str, attempts: int = 200,
             interval: float = 0.05) -> None:
    """Poll until ``predicate()`` holds (readiness, not a performance check)."""
    for _ in range(attempts):
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def wait_listening(peer: Peer, port: int, udp: bool = False) -> None:
    flag = "-Hlnu" if udp else "-Hlnt"
    wait_for(lambda: bool(peer.run(["ss", flag, f"sport = :{port}"]).stdout.strip()),
             f"{'udp' if udp else 'tcp'} port {port} in {peer.netns}")


def serve_http_peer_echo(peer: Peer, port: int, bind: str | None = None) -> subprocess.Popen[Any]:
    """An HTTP server (socat) that answers every request with the client's address."""
    listen = f"TCP-LISTEN:{port},reuseaddr,fork" + (f",bind={bind}" if bind else "")
    proc = peer.popen(["socat", listen, f"SYSTEM:{HTTP_PEER_ECHO}"])
    wait_listening(peer, port)
    return proc


# A UDP server answering each datagram with its sender's address, as socat's
# SOCAT_PEERADDR reads ("[addr]" for IPv6).  Not socat's UDP-RECVFROM with fork: while its
# child answers one datagram, the next one may be lost (1 in 4 under load, measured).
UDP_PEER_ECHO = """
import socket, sys
port, family = int(sys.argv[1]), sys.argv[2]
sock = socket.socket(socket.AF_INET if family == "4" else socket.AF_INET6, socket.SOCK_DGRAM)
if family != "4":
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(family == "6"))
sock.bind(("0.0.0.0" if family == "4" else "::", port))
while True:
    data, peer = sock.recvfrom(65536)
    host = peer[0]
    sock.sendto(((f"[{host}]" if ":" in host else host) + "\\n").encode(), peer)
"""


def serve_udp_peer_echo(peer: Peer, port: int, family: str = "4") -> subprocess.Popen[Any]:
    """A UDP server in ``peer`` that answers every datagram with the sender's address;
    ``family``: "4", "6" (v6 only) or "dual"."""
    proc = peer.popen([sys.executable, "-c", UDP_PEER_ECHO, str(port), family])
    wait_listening(peer, port, udp=True)
    return proc


def udp_ask(peer: Peer, host: str, port: int, payload: str = "ping", tries: int = 3) -> str:
    """One datagram from ``peer`` to host:port, the first answer (stripped), or "".

    A socket in the peer's namespace rather than ``socat -``: socat's client waits a fixed
    time after the end of its input, too short under load or needlessly long otherwise.
    """
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with peer.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        for _ in range(tries):
            sock.sendto(payload.encode() + b"\n", (host, port))
            try:
                return sock.recv(65536).decode().strip()
            except TimeoutError:
                continue
    return ""


def bad_input_failures(sandbox: Sandbox, argvs: list[tuple[str, ...]]) -> list[str]:
    """Run each ``hnsctl`` argv; the ones that did not exit 2 with one error line."""
    failures = []
    for argv in argvs:
        result = sandbox.hnsctl(*argv)
        lines = result.stderr.splitlines()
        if (result.returncode != 2 or len(lines) != 1
                or not lines[0].startswith("hnsctl: error:")):
            failures.append(f"{argv}: rc={result.returncode} stderr={result.stderr!r}")
    return failures


def snapshot(sandbox: Sandbox) -> dict[str, Any]:
    """State and kernel as seen from outside hns: to prove a command changed nothing."""
    def out(result: subprocess.CompletedProcess[str]) -> str:
        assert result.returncode == 0, result.stderr
        return result.stdout

    svc = sandbox.service
    instance = svc.instance
    return {
        "networks": [n.to_json() for n in svc.list_networks()],
        "vms": [v.to_json() for v in svc.list_vms()],
        "links": sorted(line.split(":")[1].split("@")[0].strip() for line in
                        out(sandbox.host.run(["ip", "-o", "link"])).splitlines()),
        "addrs": out(sandbox.host.run(["ip", "-o", "addr"])).count("inet"),
        "netns": sorted(ns for ns in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True
        ).stdout.split() if ns.startswith(f"hns-{instance}-")),
        "nft": out(sandbox.host.run(["nft", "list", "ruleset"])),
    }


class DaemonProc:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.proc: subprocess.Popen[str] | None = None

    def start(self, *extra: str) -> None:
        self.proc = subprocess.Popen([*self.sandbox.hnsctl_argv(), "daemon", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        def answering() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                _, err = self.proc.communicate()
                raise AssertionError(f"the daemon exited ({self.proc.returncode}): {err}")
            return self.status().get("Running") is True
        wait_for(answering, "the daemon to answer")

    def status(self) -> dict[str, Any]:
        result = self.sandbox.hnsctl("--json", "status")
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))

    def relay(self, name_part: str) -> dict[str, Any]:
        for relay in self.status()["Relays"]:
            if name_part in relay["Name"]:
                return dict(relay)
        raise AssertionError(f"no relay {name_part!r} in {self.status()}")

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc.communicate()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


# a resolver for the host: dnsmasq on the outside peer

DNS_NAME = "example.test"
DNS_ADDRESS = "198.51.100.80"


def start_dnsmasq(sandbox: Sandbox) -> subprocess.Popen[Any]:
    """dnsmasq on the outside peer answering ``DNS_NAME`` with ``DNS_ADDRESS``."""
    proc = sandbox.outside.popen([
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        f"--listen-address={sandbox.outside_ip}", "--bind-interfaces", "--pid-file=",
        f"--address=/{DNS_NAME}/{DNS_ADDRESS}"])
    wait_listening(sandbox.outside, 53, udp=True)
    return proc


# HTTP through curl, servers through socat


def curl(peer: Peer, url: str) -> subprocess.CompletedProcess[str]:
    return peer.run(["curl", "-sS", "-g", "--max-time", "10", url])  # type: ignore[no-any-return]


def reaches(peer: Peer, url: str, expect: str | None = None) -> bool:
    result = curl(peer, url)
    return result.returncode == 0 and (expect is None or result.stdout.strip() == expect)


def refused(peer: Peer, url: str) -> bool:
    return curl(peer, url).returncode == 7            # curl: could not connect


def serve(vm: SandboxVm, port: int, listen: str = "TCP-LISTEN", bind: str | None = None,
          answer: str = HTTP_PEER_ECHO, extra: str = "") -> subprocess.Popen[Any]:
    address = f"{listen}:{port},reuseaddr,fork" + (f",bind={bind}" if bind else "") + extra
    proc = vm.popen(["socat", address, f"SYSTEM:{answer}"])
    wait_listening(vm, port)
    return proc


def stop(proc: subprocess.Popen[Any]) -> None:
    proc.kill()
    proc.communicate(timeout=10)


def full_snapshot(sandbox: Sandbox) -> dict[str, Any]:
    """:func:`snapshot` and the rest of the state: port mappings, port proxies, the
    VMs' /etc/netns entries."""
    svc = sandbox.service
    prefix = f"hns-{svc.instance}-"
    etc = sorted(e for e in os.listdir("/etc/netns") if e.startswith(prefix)) if \
        os.path.isdir("/etc/netns") else []
    return {**snapshot(sandbox),
            "portmaps": [m.to_json() for m in svc.list_port_mappings()],
            "proxies": [p.to_json() for p in ProxyConfig(svc.store).list()],
            "etc_netns": etc}


def populate(sandbox: Sandbox) -> Sandbox:
    """A network n (10.42.0.0/24) with VM v (10.42.0.10), a port mapping (tcp 8080 -> 80)
    and a port proxy (9000 -> 10.42.0.10): something of each for a command to change."""
    sandbox.service.create_network("n", "nat", subnet="10.42.0.0/24")
    sandbox.vm("v", "n", ip="10.42.0.10", mac="00:15:5d:00:00:10")
    sandbox.service.add_port_mapping("v", "tcp", 8080, 80)
    sandbox.hnsctl("portproxy", "add", "v4tov4", "listenport=9000",
                   "connectaddress=10.42.0.10", check=True)
    return sandbox
