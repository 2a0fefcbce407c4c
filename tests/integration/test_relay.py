"""The relay engine with real clients in a sandbox.

The engine runs on a thread of the test process.  Its listening sockets are made in the
sandbox's host namespace, bound to the uplink address, and it dials the VM from the host
namespace too (through ``dial``, as the daemon's helpers will).  Clients run in the
outside namespace, which has no route to the VM: every answer they get came through the
relay.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import selectors
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from helpers.nsutil import serve_http_peer_echo, wait_for, wait_listening
from helpers.relay import Server, echo, on_engine

from hns.netns import NetnsExecutor
from hns.testing import Peer, Sandbox, SandboxVm
from portproxy.engine import Engine, Relay, RelayInfo, dial_tcp, dial_udp

T = TypeVar("T")
Handler = Callable[[socket.socket], None]


class Relays:
    """An engine running on a thread, making its sockets in the sandbox's host namespace."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.host = NetnsExecutor(sandbox.host_netns)
        self.engine = Engine(connect_timeout=5.0)
        self.thread = threading.Thread(target=self.engine.run, name="engine", daemon=True)
        self.thread.start()

    def _socket(self, family: int, kind: int) -> socket.socket:
        return self.host.call(socket.socket, family, kind)

    def on_engine(self, fn: Callable[[], T]) -> T:
        return on_engine(self.engine, fn, timeout=30)

    def tcp(self, port: int, target: tuple[str, int], **kw: Any) -> Relay:
        listener = self._socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.sandbox.uplink_ip, port))
        listener.listen(1024)
        return self.on_engine(lambda: self.engine.add_tcp(
            listener, target, dial=lambda a: dial_tcp(a, factory=self._socket), **kw))

    def udp(self, bind: tuple[str, int], target: tuple[str, int], **kw: Any) -> Relay:
        sock = self._socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(bind)
        return self.on_engine(lambda: self.engine.add_udp(
            sock, target, dial=lambda a: dial_udp(a, factory=self._socket), **kw))

    def info(self) -> RelayInfo:
        return self.engine.relays()[-1]

    def close(self) -> None:
        self.engine.stop()
        self.thread.join(30)
        self.engine.close()
        self.host.close()


@pytest.fixture
def relays(hns_sandbox: Sandbox) -> Iterator[Relays]:
    made = Relays(hns_sandbox)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def servers() -> Iterator[Callable[[Peer, tuple[str, int], Handler], Server]]:
    made: list[Server] = []

    def make(peer: Peer, address: tuple[str, int], handler: Handler) -> Server:
        sock = peer.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
        made.append(Server(handler, sock))
        return made[-1]

    yield make
    for server in made:
        server.close()


def reset_or_eof(sock: socket.socket) -> bool:
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def udp_peer_echo(nat_vm: SandboxVm) -> Iterator[tuple[str, int]]:
    """A UDP server in the VM answering each datagram with its sender's ip:port.  (Not
    socat's UDP-RECVFROM with fork: its child may swallow the next client's datagram.)"""
    sock = nat_vm.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((nat_vm.ip, 5300))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                _, (host, port) = sock.recvfrom(65536)
            except TimeoutError:
                continue
            sock.sendto(f"{host}:{port}\n".encode(), (host, port))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield nat_vm.ip, 5300
    stop.set()
    thread.join(10)
    sock.close()


def udp_ask(sandbox: Sandbox, host: str, port: int) -> str:
    """One question, one answer over UDP from the outside (10 s to answer)."""
    with sandbox.outside.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.connect((host, port))    # connected: an answer from another address is lost
        sock.send(b"ping\n")
        return sock.recv(1000).decode().strip()


def client(sandbox: Sandbox, port: int) -> socket.socket:
    sock = sandbox.outside.socket()
    sock.settimeout(60)
    sock.connect((sandbox.uplink_ip, port))
    return sock


def closed_at_once(sandbox: Sandbox, port: int) -> bool:
    """Connect and expect the relay to close the connection (a reset may beat connect)."""
    try:
        sock = client(sandbox, port)
    except ConnectionResetError:
        return True
    with sock:
        return reset_or_eof(sock)


# -- real clients ------------------------------------------------------------------------


def test_curl_through_the_relay(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                relays: Relays) -> None:
    serve_http_peer_echo(nat_vm, 8080)
    relays.tcp(8000, (nat_vm.ip, 8080), name="web")
    result = hns_sandbox.outside.run(["curl", "-sS", "--max-time", "10",
                                      f"http://{hns_sandbox.uplink_ip}:8000/"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().split(":")[0] == nat_vm.gateway   # the relay dialed
    wait_for(lambda: relays.info().connections == 0, "the connection to end")
    info = relays.info()
    assert (info.name, info.protocol, info.accepted, info.errors) == ("web", "tcp", 1, 0)
    assert info.listen == (hns_sandbox.uplink_ip, 8000) and info.connect == (nat_vm.ip, 8080)


def test_socat_tcp_through_the_relay(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                     relays: Relays) -> None:
    nat_vm.popen(["socat", "TCP-LISTEN:7000,reuseaddr,fork", "PIPE"])
    wait_listening(nat_vm, 7000)
    relays.tcp(7000, (nat_vm.ip, 7000))
    text = "".join(f"line {i}\n" for i in range(1000))
    result = hns_sandbox.outside.run(
        ["socat", "-t", "5", "-", f"TCP:{hns_sandbox.uplink_ip}:7000"], input=text)
    assert result.returncode == 0, result.stderr
    assert result.stdout == text


def test_socat_udp_through_the_relay(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                     relays: Relays, udp_peer_echo: tuple[str, int]) -> None:
    relays.udp((hns_sandbox.uplink_ip, 5353), udp_peer_echo)
    # socat's -t: how long it waits for the answer after its input ended
    result = hns_sandbox.outside.run(
        ["socat", "-t", "5", "-", f"UDP:{hns_sandbox.uplink_ip}:5353"],
        input="ping\n", timeout=30)
    assert result.stdout.strip().split(":")[0] == nat_vm.gateway, result.stderr
    info = relays.info()
    assert (info.protocol, info.connections, info.accepted) == ("udp", 1, 1)


def test_udp_on_a_wildcard_answers_from_the_address_asked(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, relays: Relays,
        udp_peer_echo: tuple[str, int]) -> None:
    # a second address on the uplink: a reply from the first would be lost, since the
    # client's socket is connected to the second (IP_PKTINFO makes the difference)
    second = "198.51.100.3"
    result = hns_sandbox.host.run(["ip", "addr", "add", f"{second}/24", "dev", "up0"])
    assert result.returncode == 0, result.stderr
    relays.udp(("0.0.0.0", 5353), udp_peer_echo)
    assert udp_ask(hns_sandbox, second, 5353).split(":")[0] == nat_vm.gateway
    assert udp_ask(hns_sandbox, hns_sandbox.uplink_ip, 5353).split(":")[0] == \
        nat_vm.gateway


def test_udp_idle_flows_expire(hns_sandbox: Sandbox, nat_vm: SandboxVm, relays: Relays,
                               udp_peer_echo: tuple[str, int]) -> None:
    relays.udp((hns_sandbox.uplink_ip, 5353), udp_peer_echo, idle_timeout=0.5)
    assert udp_ask(hns_sandbox, hns_sandbox.uplink_ip, 5353)
    wait_for(lambda: relays.info().connections == 0, "the flow to expire")
    assert relays.info().accepted == 1


# -- closing, resets, refusals -----------------------------------------------------------


def test_half_close_client_gets_the_whole_reply(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, relays: Relays,
        servers: Callable[..., Server]) -> None:
    def digest_after_eof(conn: socket.socket) -> None:
        digest = hashlib.sha256()
        while data := conn.recv(1 << 16):
            digest.update(data)
        conn.sendall(digest.hexdigest().encode() + b"\n" + b"z" * 1_000_000)

    servers(nat_vm, (nat_vm.ip, 7100), digest_after_eof)
    relays.tcp(7100, (nat_vm.ip, 7100))
    request = os.urandom(3_000_000)
    with client(hns_sandbox, 7100) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        reply = b"".join(iter(lambda: sock.recv(1 << 16), b""))
    assert reply == hashlib.sha256(request).hexdigest().encode() + b"\n" + b"z" * 1_000_000


def test_socat_half_close(hns_sandbox: Sandbox, nat_vm: SandboxVm, relays: Relays) -> None:
    nat_vm.popen(["socat", "TCP-LISTEN:7200,reuseaddr,fork", "SYSTEM:wc -c"])
    wait_listening(nat_vm, 7200)
    relays.tcp(7200, (nat_vm.ip, 7200))
    result = hns_sandbox.outside.run(
        ["socat", "-t", "5", "-", f"TCP:{hns_sandbox.uplink_ip}:7200"], input="x" * 100_000)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "100000"   # wc answered after the client's FIN


def test_target_reset_reaches_the_client_and_the_relay_goes_on(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, relays: Relays,
        servers: Callable[..., Server]) -> None:
    first = threading.Event()

    def reset_then_echo(conn: socket.socket) -> None:
        if not first.is_set():
            first.set()
            conn.recv(100)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        echo(conn)

    servers(nat_vm, (nat_vm.ip, 7300), reset_then_echo)
    relays.tcp(7300, (nat_vm.ip, 7300))
    with client(hns_sandbox, 7300) as sock:
        sock.sendall(b"hello")
        assert reset_or_eof(sock)
    wait_for(lambda: relays.info().resets == 1, "the reset to be counted")
    with client(hns_sandbox, 7300) as sock:
        sock.sendall(b"again")
        assert sock.recv(100) == b"again"
    assert relays.info().errors == 0


def test_refusing_target_resets_the_client_and_counts_an_error(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, relays: Relays) -> None:
    relays.tcp(7400, (nat_vm.ip, 7400))
    assert closed_at_once(hns_sandbox, 7400)
    wait_for(lambda: relays.info().errors == 1, "the error to be counted")
    nat_vm.popen(["socat", "TCP-LISTEN:7400,reuseaddr,fork", "PIPE"])
    wait_listening(nat_vm, 7400)
    with client(hns_sandbox, 7400) as sock:
        sock.sendall(b"up now")
        assert sock.recv(100) == b"up now"


def test_silent_target_times_out(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                 relays: Relays) -> None:
    rules = "table inet blackhole {\n chain input {\n type filter hook input priority 0;\n" \
            " tcp dport 7500 drop\n }\n}\n"
    result = nat_vm.run(["nft", "-f", "-"], input=rules)
    assert result.returncode == 0, result.stderr
    relays.tcp(7500, (nat_vm.ip, 7500), connect_timeout=0.5)
    assert closed_at_once(hns_sandbox, 7500)
    wait_for(lambda: relays.info().errors == 1, "the timeout to be counted")
    assert relays.info().connections == 0


# -- load --------------------------------------------------------------------------------


def echo_all(sock: socket.socket, stop: threading.Event) -> None:
    """A one-thread echo server for many connections (selectors)."""
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    while not stop.is_set():
        for key, _ in sel.select(0.1):
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            if conn is sock:
                with contextlib.suppress(BlockingIOError):
                    new, _ = sock.accept()
                    sel.register(new, selectors.EVENT_READ)
                continue
            data = conn.recv(1 << 16)
            if data:
                conn.sendall(data)     # small messages: the send buffer has room
            else:
                sel.unregister(conn)
                conn.close()
    for key in list(sel.get_map().values()):
        key.fileobj.close()    # type: ignore[union-attr]
    sel.close()


def test_200_concurrent_connections(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                    relays: Relays) -> None:
    listener = nat_vm.socket()
    listener.bind((nat_vm.ip, 7600))
    listener.listen(1024)
    stop = threading.Event()
    server = threading.Thread(target=echo_all, args=(listener, stop), daemon=True)
    server.start()
    relays.tcp(7600, (nat_vm.ip, 7600))
    socks = [client(hns_sandbox, 7600) for _ in range(200)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(b"message %d" % i)
        for i, sock in enumerate(socks):
            assert sock.recv(100) == b"message %d" % i
        assert relays.info().connections == 200
    finally:
        for sock in socks:
            sock.close()
        wait_for(lambda: relays.info().connections == 0, "every connection to end")
        stop.set()
        server.join(10)
    info = relays.info()
    assert (info.accepted, info.errors, info.resets) == (200, 0, 0)


SIZE = 200 << 20
BLOCK = 1 << 20


def blocks(seed: bytes) -> Iterator[bytes]:
    """SIZE bytes in BLOCK-sized pieces, each numbered, so misordering shows."""
    body = hashlib.shake_256(seed).digest(BLOCK - 8)
    for i in range(SIZE // BLOCK):
        yield struct.pack("!Q", i) + body


def expected_digest(seed: bytes) -> str:
    digest = hashlib.sha256()
    for block in blocks(seed):
        digest.update(block)
    return digest.hexdigest()


def send_and_digest(sock: socket.socket, seed: bytes) -> str:
    """Send SIZE bytes while reading what comes back; the digest of what was read."""
    def send() -> None:
        for block in blocks(seed):
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    digest = hashlib.sha256()
    while data := sock.recv(1 << 20):
        digest.update(data)
    sender.join(120)
    return digest.hexdigest()


def test_200_mb_both_ways_at_once(hns_sandbox: Sandbox, nat_vm: SandboxVm, relays: Relays,
                                  servers: Callable[..., Server]) -> None:
    seen_by_server: list[str] = []
    servers(nat_vm, (nat_vm.ip, 7700),
            lambda conn: seen_by_server.append(send_and_digest(conn, b"down")))
    relays.tcp(7700, (nat_vm.ip, 7700))
    with client(hns_sandbox, 7700) as sock:
        seen_by_client = send_and_digest(sock, b"up")
    wait_for(lambda: bool(seen_by_server), "the server to finish")
    assert seen_by_client == expected_digest(b"down")
    assert seen_by_server == [expected_digest(b"up")]
    wait_for(lambda: relays.info().connections == 0, "the connection to end")
