"""portproxy.engine on the test process's loopback: the loop, timers, readers, and TCP
and UDP relays between real sockets (127.0.0.1 only; no namespace needed)."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers.relay import (
    LO,
    Server,
    connect,
    echo,
    exchange,
    info,
    on_engine,
    read_all_then_reply,
    recv_all,
    running,
    wait_for,
)

from portproxy import _buffers
from portproxy._tcpio import TcpRelay
from portproxy.engine import Engine, Relay, RelayInfo, dial_tcp

# -- helpers ---------------------------------------------------------------------------


def reset_after_first_bytes(conn: socket.socket) -> None:
    conn.recv(10)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.fixture
def engine() -> Iterator[Engine]:
    with running(Engine(connect_timeout=2.0)) as eng:
        yield eng


def add_tcp(engine: Engine, target: tuple[str, int], **kw: Any) -> tuple[Relay, int]:
    listener = socket.socket()
    listener.bind((LO, 0))
    port = listener.getsockname()[1]
    return on_engine(engine, lambda: engine.add_tcp(listener, target, **kw)), port


def reset_or_eof(sock: socket.socket) -> bool:
    """Whether the peer closed ``sock`` (reset or FIN) without sending anything."""
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


def closed_at_once(port: int) -> bool:
    """Connect and expect the relay to close the connection (a reset may beat connect)."""
    try:
        sock = connect(port)
    except ConnectionResetError:
        return True
    with sock:
        return reset_or_eof(sock)


# -- the loop --------------------------------------------------------------------------


def test_timers_run_in_order_and_cancelled_ones_do_not() -> None:
    eng = Engine()
    seen: list[str] = []
    eng.call_later(0.02, lambda: seen.append("late"))
    eng.call_later(0.0, lambda: seen.append("now"))
    eng.call_later(0.01, lambda: seen.append("cancelled")).cancel()
    eng.call_later(0.03, eng.stop)
    eng.run()
    eng.close()
    assert seen == ["now", "late"]


def test_stop_before_run_returns_at_once_and_the_engine_runs_again() -> None:
    with Engine() as eng:
        eng.stop()
        eng.run()
        eng.call_later(0.0, eng.stop)
        eng.run()


def test_callbacks_from_other_threads_run_on_the_engine_thread(engine: Engine) -> None:
    threads: list[int] = []
    done = threading.Event()

    def record() -> None:
        threads.append(threading.get_ident())
        done.set()

    threading.Thread(target=lambda: engine.call_soon_threadsafe(record)).start()
    assert done.wait(10)
    assert threads and threads[0] != threading.get_ident()


def test_a_failing_callback_is_logged_and_the_loop_goes_on(
        engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="portproxy.engine"):
        engine.call_soon_threadsafe(boom)
        assert on_engine(engine, lambda: 42) == 42
    assert "boom" in caplog.text


def test_readers_are_called_while_readable_and_removed(engine: Engine) -> None:
    a, b = socket.socketpair()
    got: list[bytes] = []
    ready = threading.Event()

    def on_readable() -> None:
        got.append(a.recv(100))
        ready.set()

    on_engine(engine, lambda: engine.add_reader(a, on_readable))
    with pytest.raises(ValueError, match="registered already"):
        on_engine(engine, lambda: engine.add_reader(a.fileno(), on_readable))
    b.send(b"ping")
    assert ready.wait(10) and got == [b"ping"]
    assert on_engine(engine, lambda: engine.remove_reader(a)) is True
    assert on_engine(engine, lambda: engine.remove_reader(a)) is False
    a.close()
    b.close()


def test_an_event_of_a_closed_fd_does_not_reach_the_fds_next_owner() -> None:
    """A handler closes an fd that has an event later in the same batch, and a new socket
    gets that fd number: the stale event must not be taken for the new socket's."""
    a1, a2 = socket.socketpair()
    b1, b2 = socket.socketpair()
    spurious: list[int] = []
    made: list[socket.socket] = []
    with Engine() as eng:
        def on_a() -> None:
            a1.recv(10)
            eng.remove_reader(b1)
            reused = b1.fileno()
            b1.close()
            new, peer = socket.socketpair()        # takes the lowest free fd: b1's
            made.extend((new, peer))
            assert new.fileno() == reused
            eng.add_reader(new, lambda: spurious.append(new.fileno()))
            eng.call_later(0.05, eng.stop)

        eng.add_reader(a1, on_a)
        eng.add_reader(b1, lambda: None)
        a2.send(b"a")                              # a is ready first, then b
        b2.send(b"b")
        eng.run()
    assert spurious == []
    for sock in (a1, a2, b2, *made):
        sock.close()


def test_close_while_running_is_refused(engine: Engine) -> None:
    with pytest.raises(RuntimeError, match="stop the engine"):
        on_engine(engine, engine.close)


def test_addresses_must_be_literal_ips() -> None:
    with Engine() as eng, socket.socket() as sock:
        with pytest.raises(ValueError, match="not an IP address"):
            eng.add_tcp(sock, ("localhost", 80))
        with pytest.raises(ValueError, match="bad address"):
            eng.add_tcp(sock, (LO, 0))


def test_relay_info_validates() -> None:
    with pytest.raises(ValueError):
        RelayInfo("x", "sctp", (LO, 1), (LO, 2), 0, 0, 0)
    with pytest.raises(ValueError):
        RelayInfo("x", "tcp", (LO, 1), (LO, 2), -1, 0, 0)


# -- TCP -------------------------------------------------------------------------------


@pytest.fixture(params=["splice", "copy", "fallback"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """splice: the default; copy: splice=False; fallback: splice refused with EINVAL."""
    if request.param == "fallback":
        def refuse(*_args: Any) -> int:
            raise OSError(errno.EINVAL, "splice refused")
        monkeypatch.setattr(_buffers, "_splice", refuse)
    return str(request.param)


def test_echo_and_a_large_transfer_both_ways(
        mode: str, servers: Callable[..., Server]) -> None:
    server = servers(echo)
    with Engine(splice=mode != "copy", pipe_size=64 << 10, buffer_size=64 << 10) as eng:
        listener = socket.create_server((LO, 0))
        port = listener.getsockname()[1]
        eng.add_tcp(listener, server.address, name="echo")
        thread = threading.Thread(target=eng.run, daemon=True)
        thread.start()
        payload = os.urandom(1 << 20) * 8
        with connect(port) as client:
            got = exchange(client, payload)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        wait_for(lambda: info(eng).connections == 0, "the connection to end")
        assert info(eng) == RelayInfo("echo", "tcp", (LO, port), server.address, 0, 1, 0, 0,
                                      bytes_up=len(payload), bytes_down=len(payload))
        eng.stop()
        thread.join(10)


def test_an_idle_connection_holds_no_pipe(
        engine: Engine, servers: Callable[..., Server]) -> None:
    server = servers(echo)
    relay, port = add_tcp(engine, server.address)
    assert isinstance(relay, TcpRelay)
    with connect(port) as client:
        for _ in range(3):
            client.sendall(b"ping")
            assert client.recv(10) == b"ping"
        (conn,) = on_engine(engine, lambda: list(relay.conns))
        assert on_engine(engine, lambda: [way._r for way in conn.ways]) == [-1, -1]
        assert engine.pipes.made <= 2


def test_a_fin_right_behind_the_last_bytes_is_passed_on(
        engine: Engine, servers: Callable[..., Server]) -> None:
    # data and FIN reach the relay together: the short read of the data must not make
    # it forget the FIN (no new edge comes for it)
    server = servers(lambda conn: conn.sendall(b"bye"))
    _, port = add_tcp(engine, server.address)
    for _ in range(30):
        with connect(port) as client:
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"bye"


def test_half_close_the_client_still_gets_the_whole_reply(
        engine: Engine, servers: Callable[..., Server]) -> None:
    server = servers(read_all_then_reply)
    _, port = add_tcp(engine, server.address)
    request = os.urandom(500_000)
    with connect(port) as client:
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        reply = recv_all(client)
    digest, rest = reply.split(b"\n", 1)
    assert digest.decode() == hashlib.sha256(request).hexdigest()
    assert rest == b"r" * 300_000


def test_refused_target_resets_the_client_and_counts_an_error(engine: Engine) -> None:
    with socket.socket() as unused:
        unused.bind((LO, 0))
        closed_port = unused.getsockname()
    _, port = add_tcp(engine, closed_port)
    assert closed_at_once(port)
    wait_for(lambda: info(engine).errors == 1, "the error to be counted")
    assert info(engine).connections == 0 and info(engine).accepted == 1


def test_failing_dial_resets_the_client_and_counts_an_error(engine: Engine) -> None:
    def dial(_address: tuple[str, int]) -> socket.socket:
        raise OSError(errno.ENETUNREACH, "no route")

    _, port = add_tcp(engine, (LO, 9), dial=dial)
    assert closed_at_once(port)
    wait_for(lambda: info(engine).errors == 1, "the error to be counted")


def test_a_target_reset_resets_the_client_and_the_relay_goes_on(
        engine: Engine, servers: Callable[..., Server]) -> None:
    resetting = servers(reset_after_first_bytes)
    relay, port = add_tcp(engine, resetting.address)
    with connect(port) as client:
        client.sendall(b"hello")
        with pytest.raises(ConnectionResetError):
            while client.recv(10):
                pass
            client.sendall(b"more")      # EOF first? then writing meets the reset
            client.recv(10)
    wait_for(lambda: info(engine).resets == 1, "the reset to be counted")
    assert info(engine).errors == 0
    on_engine(engine, lambda: engine.remove(relay))
    server = servers(echo)
    _, port = add_tcp(engine, server.address)
    with connect(port) as client:
        client.sendall(b"still here")
        assert client.recv(100) == b"still here"


def test_clients_resetting_mid_stream_do_not_hurt_the_loop(
        engine: Engine, servers: Callable[..., Server]) -> None:
    server = servers(echo)
    _, port = add_tcp(engine, server.address)
    for _ in range(20):
        client = connect(port)
        client.sendall(os.urandom(200_000))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
    wait_for(lambda: info(engine).connections == 0, "every connection to end")
    with connect(port) as client:
        client.sendall(b"ok")
        assert client.recv(10) == b"ok"
    assert info(engine).errors == 0


def test_a_stalled_reader_never_grows_the_relay_buffers(
        engine: Engine, servers: Callable[..., Server]) -> None:
    release = threading.Event()
    server = servers(lambda conn: (release.wait(30), recv_all(conn)))
    relay, port = add_tcp(engine, server.address)
    assert isinstance(relay, TcpRelay)
    sent = 0
    with connect(port) as client:
        client.setblocking(False)
        chunk = b"s" * 65536
        idle = 0
        while idle < 20 and sent < 512 << 20:      # until the relay stops taking bytes
            try:
                sent += client.send(chunk)
                idle = 0
            except BlockingIOError:
                idle += 1
                time.sleep(0.02)
        (conn,) = on_engine(engine, lambda: list(relay.conns))
        pending = on_engine(engine, lambda: conn.state.up.pending)
        assert pending <= conn.state.up.capacity == engine.pipes.size
        assert sent < 128 << 20          # socket buffers and one pipe, not everything
        release.set()
        client.shutdown(socket.SHUT_WR)
    wait_for(lambda: info(engine).connections == 0, "the connection to end")


def test_connect_timeout_resets_the_client(engine: Engine) -> None:
    # a dial that never completes: a socket that is never connected stays silent
    def dial(_address: tuple[str, int]) -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        return sock

    _, port = add_tcp(engine, (LO, 9), dial=dial, connect_timeout=0.2)
    assert closed_at_once(port)
    wait_for(lambda: info(engine).errors == 1, "the timeout to be counted")


def test_remove_resets_live_connections_and_closes_the_listener(
        engine: Engine, servers: Callable[..., Server]) -> None:
    server = servers(echo)
    relay, port = add_tcp(engine, server.address)
    with connect(port) as client:
        client.sendall(b"x")
        assert client.recv(1) == b"x"
        on_engine(engine, lambda: engine.remove(relay))
        assert reset_or_eof(client)
    assert engine.relays() == []
    with pytest.raises(ConnectionRefusedError):
        connect(port)


# -- UDP -------------------------------------------------------------------------------


@pytest.fixture
def udp_echo() -> Iterator[tuple[str, int]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LO, 0))
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(65536)
            except TimeoutError:
                continue
            sock.sendto(b"echo:" + data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()
    stop.set()
    thread.join(5)
    sock.close()


def add_udp(engine: Engine, target: tuple[str, int], **kw: Any) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LO, 0))
    port: int = sock.getsockname()[1]
    on_engine(engine, lambda: engine.add_udp(sock, target, **kw))
    return port


def udp_client(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(10)
    sock.connect((LO, port))
    return sock


def test_udp_datagrams_go_both_ways_a_flow_per_client(
        engine: Engine, udp_echo: tuple[str, int]) -> None:
    port = add_udp(engine, udp_echo)
    with udp_client(port) as a, udp_client(port) as b:
        for i in range(5):
            a.send(b"a%d" % i)
            assert a.recv(100) == b"echo:a%d" % i
        b.send(b"b" * 60000)
        assert b.recv(65536) == b"echo:" + b"b" * 60000
        relay = info(engine)
        assert (relay.protocol, relay.connections, relay.accepted) == ("udp", 2, 2)


def test_udp_idle_flows_expire(engine: Engine, udp_echo: tuple[str, int]) -> None:
    port = add_udp(engine, udp_echo, idle_timeout=0.2)
    with udp_client(port) as a:
        a.send(b"x")
        assert a.recv(100) == b"echo:x"
        wait_for(lambda: info(engine).connections == 0, "the flow to expire")
        a.send(b"y")                       # comes back as a new flow
        assert a.recv(100) == b"echo:y"
    assert info(engine).accepted == 2


def test_udp_flow_cap_evicts_the_oldest(engine: Engine, udp_echo: tuple[str, int]) -> None:
    port = add_udp(engine, udp_echo, max_flows=2)
    clients = [udp_client(port) for _ in range(3)]
    try:
        for i, client in enumerate(clients):
            client.send(b"%d" % i)
            assert client.recv(100) == b"echo:%d" % i
        assert info(engine).connections == 2 and info(engine).accepted == 3
    finally:
        for client in clients:
            client.close()


def test_dial_tcp_in_a_factory_and_refuses_names() -> None:
    made: list[tuple[int, int]] = []

    def factory(family: int, kind: int) -> socket.socket:
        made.append((family, kind))
        return socket.socket(family, kind)

    with socket.create_server((LO, 0)) as server:
        sock = dial_tcp(server.getsockname(), factory=factory)
        sock.close()
    assert made == [(socket.AF_INET, socket.SOCK_STREAM)]
    with pytest.raises(ValueError):
        dial_tcp(("example.org", 80))


# -- limits: idle timeout, connection cap, loops ---------------------------------------


def echoes(sock: socket.socket, data: bytes = b"x") -> bool:
    sock.sendall(data)
    return sock.recv(len(data)) == data


def test_an_idle_connection_is_closed_and_counted_a_busy_one_is_not(
        engine: Engine, servers: Callable[..., Server]) -> None:
    server = servers(echo)
    relay, port = add_tcp(engine, server.address, idle_timeout=0.5)
    with connect(port) as idle, connect(port) as busy:
        assert echoes(idle) and echoes(busy)
        for _ in range(30):            # 1.5 s of traffic, a byte every 50 ms
            assert echoes(busy)
            time.sleep(0.05)
        assert reset_or_eof(idle)
        assert echoes(busy)
    wait_for(lambda: relay.info().idle_closed >= 1, "the idle close to be counted")
    assert relay.info().idle_timeout == 0.5 and relay.info().errors == 0


def test_no_idle_timeout_by_default(engine: Engine, servers: Callable[..., Server]) -> None:
    relay, port = add_tcp(engine, servers(echo).address)
    assert relay.info().idle_timeout == 0 and relay.info().max_connections == 0
    with connect(port) as client:
        assert echoes(client)
        time.sleep(0.3)
        assert echoes(client)


def test_over_the_cap_new_connections_are_refused_and_logged_once(
        engine: Engine, servers: Callable[..., Server],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="portproxy.engine")
    relay, port = add_tcp(engine, servers(echo).address, max_connections=2)
    first, second = connect(port), connect(port)
    assert echoes(first) and echoes(second)
    assert all(closed_at_once(port) for _ in range(3))
    wait_for(lambda: relay.info().refused == 3, "three refusals")
    first.close()
    wait_for(lambda: relay.info().connections == 1, "a connection to end")
    with connect(port) as third:
        assert echoes(third)
        assert closed_at_once(port)
        wait_for(lambda: relay.info().refused == 4, "the fourth refusal")
    second.close()
    refusing = [r for r in caplog.records if "refusing new ones" in r.getMessage()]
    assert len(refusing) == 2           # once per time at the cap, not per connection
    assert any("accepting again" in r.getMessage() for r in caplog.records)
    assert relay.info().max_connections == 2 and relay.info().errors == 0


def listener_on_lo() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind((LO, 0))
    return sock, sock.getsockname()[1]


def test_a_relay_connecting_to_itself_is_cut(engine: Engine,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="portproxy.engine")
    sock, port = listener_on_lo()
    relay = on_engine(engine, lambda: engine.add_tcp(sock, (LO, port), name="self"))
    assert closed_at_once(port)
    wait_for(lambda: relay.info().loops == 1, "the loop to be cut")
    wait_for(lambda: relay.info().connections == 0, "the chain to end")
    assert relay.info().accepted == 1 and len(engine.dials) == 0
    assert sum("a loop" in r.getMessage() for r in caplog.records) == 1


def test_a_loop_through_two_relays_is_cut_and_a_chain_is_not(
        engine: Engine, servers: Callable[..., Server]) -> None:
    (sock_a, port_a), (sock_b, port_b) = listener_on_lo(), listener_on_lo()
    a = on_engine(engine, lambda: engine.add_tcp(sock_a, (LO, port_b), name="a"))
    b = on_engine(engine, lambda: engine.add_tcp(sock_b, (LO, port_a), name="b"))
    assert closed_at_once(port_a)
    wait_for(lambda: a.info().loops == 1, "the loop to be cut at a")
    assert b.info().loops == 0 and b.info().accepted == 1
    on_engine(engine, lambda: engine.remove(b))
    server = servers(echo)
    (sock_c, port_c), (sock_d, port_d) = listener_on_lo(), listener_on_lo()
    on_engine(engine, lambda: engine.add_tcp(sock_c, (LO, port_d), name="c"))
    d = on_engine(engine, lambda: engine.add_tcp(sock_d, server.address, name="d"))
    with connect(port_c) as client:     # c -> d -> the server: a chain, no loop
        assert echoes(client, b"chained")
    assert d.info().loops == 0 and d.info().accepted == 1


def test_a_relay_dialing_elsewhere_is_not_watched_for_loops(engine: Engine) -> None:
    sock, port = listener_on_lo()
    relay = on_engine(engine, lambda: engine.add_tcp(
        sock, (LO, port), dial=lambda address: dial_tcp(address), name="own dial",
        max_connections=20))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        try:    # the cascade may reach the cap, and reset back, before connect() returns
            client.connect((LO, port))
            client.sendall(b"x")
            connected = True
        except (ConnectionResetError, BrokenPipeError):
            connected = False
        # not cut as a loop: the cascade grows to the cap; stop it by removing the relay
        wait_for(lambda: relay.info().refused >= 1, "the cascade to reach the cap")
        assert relay.info().loops == 0 and relay.info().accepted == 20
        on_engine(engine, lambda: engine.remove(relay))
        assert not connected or reset_or_eof(client)


def test_a_bulky_connection_moved_to_a_worker_still_times_out(
        servers: Callable[..., Server]) -> None:
    def discard(conn: socket.socket) -> None:
        while conn.recv(1 << 20):
            pass

    eng = Engine(connect_timeout=2.0, workers=1)
    thread = threading.Thread(target=eng.run, name="engine", daemon=True)
    thread.start()
    try:
        relay, port = add_tcp(eng, servers(discard).address, idle_timeout=0.5)
        assert isinstance(relay, TcpRelay)
        with connect(port) as client:
            client.sendall(os.urandom(1 << 20) * 8)       # bulky: placed on the worker
            wait_for(lambda: any(c.loop is not eng.loop for c in list(relay.conns)),
                     "the connection to move to the worker")
            assert reset_or_eof(client)
        wait_for(lambda: relay.info().idle_closed == 1, "the idle close on the worker")
    finally:
        eng.stop()
        thread.join(10)
        eng.close()


class _NoShutdown(socket.socket):
    """A dialed socket whose shutdown fails, as when its peer reset meanwhile."""

    def shutdown(self, how: int) -> None:
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")


def test_a_failed_shutdown_of_the_last_half_still_ends_the_connection(
        engine: Engine, servers: Callable[..., Server]) -> None:
    def reply_first(conn: socket.socket) -> None:
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)       # the server's half ends first ...
        while conn.recv(100):
            pass

    server = servers(reply_first)
    relay, port = add_tcp(engine, server.address,
                          dial=lambda address: dial_tcp(address, _NoShutdown))
    with connect(port) as client:
        assert client.recv(100) == b"hello"
        assert client.recv(100) == b""
        client.shutdown(socket.SHUT_WR)     # ... the client's last: its shutdown fails
        wait_for(lambda: relay.info().connections == 0, "the connection to end")
    assert relay.info().accepted == 1
