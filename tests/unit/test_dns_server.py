"""portproxy._dnsio on the test process's loopback: the DNS proxy's sockets against fake
upstreams (threads), queries over UDP and TCP (127.0.0.1 only; no namespace needed)."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers.relay import LO, on_engine, running

from portproxy import dnsmsg
from portproxy._dnsio import DnsServer, Listener
from portproxy.dnsmsg import Header, Rcode
from portproxy.dnsstate import Upstream
from portproxy.engine import Engine

A, IN = 1, 1
Behaviour = Callable[[bytes, bool], bytes | None]


def query(id: int = 0x4242, name: bytes = b"\x07example\x04test\x00") -> bytes:
    return struct.pack("!6H", id, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", A, IN)


def answer(q: bytes, *, tc: bool = False, rdata: bytes = bytes([198, 51, 100, 80])) -> bytes:
    flags = 0x8180 | (0x0200 if tc else 0)
    rr = b"\xc0\x0c" + struct.pack("!HHIH", A, IN, 60, len(rdata)) + rdata
    return q[:2] + struct.pack("!5H", flags, 1, 1, 0, 0) + q[12:] + rr


def good(q: bytes, tcp: bool) -> bytes:
    return answer(q)


def udp_and_tcp_on_one_port() -> tuple[socket.socket, socket.socket]:
    """A UDP socket and a TCP listener on one loopback port (a port free for UDP may be
    taken for TCP: another port then)."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((LO, 0))
        try:
            return udp, socket.create_server((LO, udp.getsockname()[1]))
        except OSError:
            udp.close()
    raise AssertionError("no loopback port free for both UDP and TCP")


class FakeUpstream:
    """UDP and TCP on one loopback port, answering as ``behaviour(query, tcp)`` says."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.udp_queries: list[bytes] = []
        self.udp_peers: list[tuple[str, int]] = []
        self.tcp_queries: list[bytes] = []
        self.udp, self.tcp = udp_and_tcp_on_one_port()
        self.port = self.udp.getsockname()[1]
        self.upstream = Upstream(LO, self.port)
        self._threads = [threading.Thread(target=self._serve_udp, daemon=True),
                         threading.Thread(target=self._serve_tcp, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _serve_udp(self) -> None:
        while True:
            try:
                data, peer = self.udp.recvfrom(65535)
            except OSError:
                return
            if peer is None:                # shut down
                return
            self.udp_queries.append(data)
            self.udp_peers.append(peer)
            reply = self.behaviour(data, False)
            if reply is not None:
                self.udp.sendto(reply, peer)

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            with conn:
                data = read_framed(conn)
                self.tcp_queries.append(data)
                reply = self.behaviour(data, True)
                if reply is not None:
                    conn.sendall(len(reply).to_bytes(2, "big") + reply)

    def close(self) -> None:
        for sock in (self.udp, self.tcp):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(5)


def read_framed(conn: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data
    return exactly(int.from_bytes(exactly(2), "big"))


def assert_closed(conn: socket.socket) -> None:
    """The server closed ``conn`` (a reset if it had unread bytes)."""
    with contextlib.suppress(ConnectionResetError):
        assert conn.recv(10) == b""


def assert_refused_over_tcp(address: tuple[str, int], source: str, q: bytes) -> None:
    """A TCP query from ``source`` is reset unanswered (the reset may beat connect())."""
    try:
        with socket.create_connection(address, timeout=10,
                                      source_address=(source, 0)) as conn:
            conn.sendall(len(q).to_bytes(2, "big") + q)
            assert_closed(conn)
    except (ConnectionResetError, BrokenPipeError):
        pass


def wait_until(predicate: Callable[[], bool]) -> None:
    for _ in range(400):
        if predicate():
            return
        time.sleep(0.025)
    raise AssertionError("timed out")


class Proxy:
    """A DnsServer on the engine thread, listening on loopback, with given upstreams."""

    def __init__(self, engine: Engine, upstreams: list[Upstream],
                 listen: dict[str, Any] | None = None, **kw: Any) -> None:
        self.engine = engine
        self.upstreams = tuple(upstreams)
        self.server = on_engine(engine, lambda: DnsServer(engine, lambda: self.upstreams, **kw))
        self.listener: Listener = on_engine(
            engine, lambda: self.server.listen("t", LO, 0, **(listen or {})))
        self.address = (LO, self.listener.port)

    def ask_udp(self, data: bytes, timeout: float = 10.0, source: str = LO) -> bytes | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((source, 0))
            sock.settimeout(timeout)
            sock.sendto(data, self.address)
            try:
                return sock.recv(65535)
            except TimeoutError:
                return None

    def ask_tcp(self, *messages: bytes, source: str = LO) -> list[bytes]:
        with socket.create_connection(self.address, timeout=10,
                                      source_address=(source, 0)) as conn:
            conn.sendall(b"".join(len(m).to_bytes(2, "big") + m for m in messages))
            return [read_framed(conn) for _ in messages]


@pytest.fixture
def engine() -> Iterator[Engine]:
    with running(Engine()) as eng:
        yield eng


@pytest.fixture
def upstreams() -> Iterator[Callable[[Behaviour], FakeUpstream]]:
    made: list[FakeUpstream] = []

    def make(behaviour: Behaviour) -> FakeUpstream:
        made.append(FakeUpstream(behaviour))
        return made[-1]

    yield make
    for upstream in made:
        upstream.close()


@pytest.fixture
def proxies(engine: Engine) -> Iterator[Callable[..., Proxy]]:
    made: list[Proxy] = []

    def make(upstreams: list[Upstream], **kw: Any) -> Proxy:
        made.append(Proxy(engine, upstreams, **kw))
        return made[-1]

    yield make
    for proxy in made:
        on_engine(engine, proxy.server.close)


def test_udp_query_is_answered_with_the_client_id(
        upstreams: Callable[[Behaviour], FakeUpstream], proxies: Callable[..., Proxy]) -> None:
    up = upstreams(good)
    proxy = proxies([up.upstream])
    q = query(0x1234)
    assert proxy.ask_udp(q) == answer(q)
    (sent,) = up.udp_queries
    assert sent[2:] == q[2:]                      # the same query, under another id
    assert proxy.listener.queries == 1 and proxy.listener.failures == 0


def test_pipelined_tcp_queries(upstreams: Callable[[Behaviour], FakeUpstream],
                               proxies: Callable[..., Proxy]) -> None:
    proxy = proxies([upstreams(good).upstream])
    queries = [query(i, b"\x01" + bytes([97 + i]) + b"\x04test\x00") for i in range(20)]
    answers = proxy.ask_tcp(*queries)
    assert sorted(answers) == sorted(answer(q) for q in queries)


def test_silent_upstream_gives_servfail(upstreams: Callable[[Behaviour], FakeUpstream],
                                        proxies: Callable[..., Proxy]) -> None:
    silent = upstreams(lambda q, tcp: None)
    proxy = proxies([silent.upstream], timeout=0.2)
    q = query(7)
    reply = proxy.ask_udp(q)
    assert reply == dnsmsg.servfail(dnsmsg.parse_query(q))
    assert proxy.listener.failures == 1
    (tcp_reply,) = proxy.ask_tcp(q)
    assert Header.parse(tcp_reply).rcode == Rcode.SERVFAIL


def test_closed_port_moves_on_at_once(upstreams: Callable[[Behaviour], FakeUpstream],
                                      proxies: Callable[..., Proxy]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as placeholder:
        placeholder.bind((LO, 0))
        closed = Upstream(LO, placeholder.getsockname()[1])
    up = upstreams(good)
    # the per-try timeout is far longer than the client waits: only ICMP port
    # unreachable (IP_RECVERR) can move the query on to the second upstream in time
    proxy = proxies([closed, up.upstream], timeout=60.0)
    q = query(9)
    assert proxy.ask_udp(q, timeout=20) == answer(q)


def test_garbage_from_upstream_is_dropped(upstreams: Callable[[Behaviour], FakeUpstream],
                                          proxies: Callable[..., Proxy]) -> None:
    junk = upstreams(lambda q, tcp: b"\xde\xad" + q[:1] + b"garbage")
    wrong_id = upstreams(lambda q, tcp: answer(bytes([q[0] ^ 1]) + q[1:]))
    proxy = proxies([junk.upstream, wrong_id.upstream], timeout=0.2)
    reply = proxy.ask_udp(query(3))
    assert reply is not None and Header.parse(reply).rcode == Rcode.SERVFAIL
    assert proxy.server.forwarding.dropped == 2


def test_truncated_answers(upstreams: Callable[[Behaviour], FakeUpstream],
                           proxies: Callable[..., Proxy]) -> None:
    big = bytes(range(200))
    up = upstreams(lambda q, tcp: answer(q, rdata=big) if tcp else answer(q, tc=True))
    proxy = proxies([up.upstream])
    q = query(11)
    udp_reply = proxy.ask_udp(q)
    assert udp_reply is not None and Header.parse(udp_reply).tc      # passed on as it is
    assert proxy.ask_tcp(q) == [answer(q, rdata=big)]               # asked again over TCP
    assert len(up.tcp_queries) == 1 and up.tcp_queries[0][2:] == q[2:]


def test_malformed_queries(upstreams: Callable[[Behaviour], FakeUpstream],
                           proxies: Callable[..., Proxy]) -> None:
    proxy = proxies([upstreams(good).upstream])
    formerr = proxy.ask_udp(query(5)[:-3])
    assert formerr is not None and Header.parse(formerr).rcode == Rcode.FORMERR
    assert proxy.ask_udp(b"\x01\x02\x03", timeout=0.3) is None       # no header: dropped
    assert proxy.ask_udp(answer(query(6)), timeout=0.3) is None      # a response: dropped
    assert proxy.ask_udp(query(6)) == answer(query(6))               # still serving
    assert proxy.listener.malformed == 3
    with socket.create_connection(proxy.address, timeout=10) as conn:
        conn.sendall(b"\x00\x03abc")                                  # garbage: closed
        assert_closed(conn)


def test_no_loop_through_its_own_address(proxies: Callable[..., Proxy]) -> None:
    proxy = proxies([])
    proxy.upstreams = (Upstream(*proxy.address),)
    reply = proxy.ask_udp(query(1))
    assert reply is not None and Header.parse(reply).rcode == Rcode.SERVFAIL
    assert proxy.server.forwarding.upstreams == ()


def test_idle_tcp_client_is_closed(upstreams: Callable[[Behaviour], FakeUpstream],
                                   proxies: Callable[..., Proxy]) -> None:
    proxy = proxies([upstreams(good).upstream], idle_timeout=0.2)
    with socket.create_connection(proxy.address, timeout=10) as conn:
        assert_closed(conn)
    wait_until(lambda: not proxy.listener.clients)


def test_second_listener_on_the_same_address_is_refused(proxies: Callable[..., Proxy],
                                                        engine: Engine) -> None:
    proxy = proxies([])
    with pytest.raises(OSError):
        on_engine(engine, lambda: proxy.server.listen("again", LO, proxy.listener.port))


def test_unlisten_closes_clients(upstreams: Callable[[Behaviour], FakeUpstream],
                                 proxies: Callable[..., Proxy], engine: Engine) -> None:
    proxy = proxies([upstreams(good).upstream])
    with socket.create_connection(proxy.address, timeout=10) as conn:
        conn.sendall(b"\x00")                         # half a length prefix
        wait_until(lambda: bool(proxy.listener.clients))
        on_engine(engine, lambda: proxy.server.unlisten(proxy.listener))
        assert_closed(conn)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.address, timeout=10)


def test_only_the_network_s_clients_are_answered(
        upstreams: Callable[[Behaviour], FakeUpstream], proxies: Callable[..., Proxy]) -> None:
    # loopback plays the bridge: the listener's address (127.0.0.1) is the gateway
    up = upstreams(good)
    subnet = ipaddress.ip_network("127.0.0.0/24")
    proxy = proxies([up.upstream], listen={"device": "lo", "subnet": subnet})
    q = query(21)
    assert proxy.ask_udp(q, source="127.0.0.5") == answer(q)
    assert proxy.ask_tcp(q, source="127.0.0.5") == [answer(q)]
    for outsider in ("127.0.0.1", "127.0.1.5"):     # the gateway itself, another subnet
        assert proxy.ask_udp(q, timeout=0.3, source=outsider) is None
        assert_refused_over_tcp(proxy.address, outsider, q)
    assert proxy.listener.ignored == 4
    assert proxy.listener.queries == 2 and len(up.udp_queries) == 2


def test_a_bridge_that_does_not_exist_cannot_be_served(proxies: Callable[..., Proxy],
                                                       engine: Engine) -> None:
    proxy = proxies([])
    with pytest.raises(OSError) as caught:
        on_engine(engine, lambda: proxy.server.listen("gone", LO, 0, device="hnsnosuch0"))
    assert caught.value.errno == errno.ENODEV


def test_every_try_has_a_socket_of_its_own(upstreams: Callable[[Behaviour], FakeUpstream],
                                          proxies: Callable[..., Proxy]) -> None:
    up = upstreams(good)
    proxy = proxies([up.upstream])
    for i in range(4):
        q = query(30 + i)
        assert proxy.ask_udp(q) == answer(q)
    ports = [port for _host, port in up.udp_peers]
    assert len(set(ports)) >= 3, ports              # a fresh random port per query
    assert proxy.listener.port not in ports
    wait_until(lambda: not proxy.server._udp)       # every try's socket closed


def test_only_the_right_answer_on_the_right_socket_is_taken(
        proxies: Callable[..., Proxy]) -> None:
    """An upstream that first sends a spoof from another port, an answer with another
    id and one to another question, then the right one: the client gets the right one."""
    real = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    spoofer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    real.bind((LO, 0))
    spoofer.bind((LO, 0))
    evil = bytes([203, 0, 113, 66])

    def serve() -> None:
        q, peer = real.recvfrom(65535)
        spoofer.sendto(answer(q, rdata=evil), peer)                       # another port
        real.sendto(answer(bytes([q[0] ^ 0x55]) + q[1:], rdata=evil), peer)   # another id
        other = q[:13] + b"EVILPLE" + q[20:]                             # another name
        real.sendto(answer(other, rdata=evil), peer)
        wait_until(lambda: proxy.server.forwarding.dropped >= 3)
        real.sendto(answer(q), peer)

    proxy = proxies([Upstream(LO, real.getsockname()[1])])
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        q = query(41)
        assert proxy.ask_udp(q) == answer(q)
        thread.join(10)
        assert proxy.server.forwarding.dropped == 3
    finally:
        real.close()
        spoofer.close()
