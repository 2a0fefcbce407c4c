"""portproxy.tcp: the sans-IO state of a relayed TCP connection, no sockets.

Most tests drive two in-memory peers (a client and a server program) against each other
through a simulated relay that does exactly what the epoll layer does: it reads a source
only when the state wants it, writes a sink only when there are pending bytes, reports
what happened and carries out the actions returned.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable

import pytest

from portproxy.tcp import (
    _CONN_TRANSITIONS,
    _HALF_TRANSITIONS,
    Abort,
    Action,
    Close,
    ConnState,
    Direction,
    Finished,
    Half,
    HalfState,
    Outcome,
    RelayStateError,
    ShutdownWrite,
    Side,
    TcpConnection,
    _ConnEvent,
    _HalfEvent,
)


class Peer:
    """One end of a simulated TCP connection, as its program sees it."""

    def __init__(self, window: int) -> None:
        self.outgoing = bytearray()   # written by the program, not yet taken by the relay
        self.incoming = bytearray()   # taken from the relay, not yet read by the program
        self.received = bytearray()   # everything the program read
        self.fin_sent = False         # the program shut its write side
        self.fin_received = False     # the relay passed a FIN on
        self.was_reset = False
        self.closed_by_relay = False
        self.window = window          # how many unread bytes the peer's kernel accepts

    def room(self) -> int:
        return self.window - len(self.incoming)

    def read_all(self, limit: int | None = None) -> None:
        take = len(self.incoming) if limit is None else min(limit, len(self.incoming))
        self.received += self.incoming[:take]
        del self.incoming[:take]


class SimRelay:
    """The epoll layer of the relay, simulated: buffers are bytearrays, sockets are Peers."""

    def __init__(self, capacity: int, window: int = 1 << 20, chunk: int = 7000) -> None:
        self.conn = TcpConnection(now=0.0, connect_timeout=10.0, capacity=capacity)
        self.peers = (Peer(window), Peer(window))   # indexed by Side
        self.buffers = (bytearray(), bytearray())   # indexed by Direction
        self.chunk = chunk
        self.actions: list[Action] = []
        self.max_pending = 0
        self.eof_seen = [False, False]

    @property
    def client(self) -> Peer:
        return self.peers[Side.CLIENT]

    @property
    def server(self) -> Peer:
        return self.peers[Side.TARGET]

    def apply(self, actions: list[Action]) -> None:
        self.actions += actions
        for action in actions:
            if isinstance(action, ShutdownWrite):
                # the FIN must come after every byte of that half
                assert not self.buffers[Direction(1 - action.side)]
                self.peers[action.side].fin_received = True
            elif isinstance(action, Abort):
                self.peers[action.side].was_reset = True
            elif isinstance(action, Close):
                self.peers[action.side].closed_by_relay = True

    def step(self) -> bool:
        """One round over both halves; whether anything happened."""
        progress = False
        for d in Direction:
            if self.conn.closed:
                break
            progress |= self._fill(d)
            progress |= self._drain(d)
        return progress

    def _fill(self, d: Direction) -> bool:
        half, source = self.conn.halves[d], self.peers[d.source]
        if not half.wants_read():
            return False
        n = min(half.room(), len(source.outgoing), self.chunk)
        if n:
            self.buffers[d].extend(source.outgoing[:n])
            del source.outgoing[:n]
            self.conn.received(d, n)
            self.max_pending = max(self.max_pending, half.pending)
            return True
        if source.fin_sent and not self.eof_seen[d]:
            self.eof_seen[d] = True
            self.apply(self.conn.eof(d))
            return True
        return False

    def _drain(self, d: Direction) -> bool:
        half, sink = self.conn.halves[d], self.peers[d.sink]
        if not half.wants_write():
            return False
        n = min(half.pending, sink.room(), self.chunk)
        if not n:
            return False
        sink.incoming += self.buffers[d][:n]
        del self.buffers[d][:n]
        self.apply(self.conn.sent(d, n))
        return True


def run(sim: SimRelay, programs: list[Callable[[], bool]], limit: int = 100_000) -> None:
    """Step the relay and the peers' programs until nothing happens any more."""
    for _ in range(limit):
        progress = sim.step()
        for program in programs:
            progress |= program()
        if not progress:
            return
    raise AssertionError("the simulation did not settle")


def connected(sim: SimRelay) -> SimRelay:
    assert sim.conn.connected() == []
    return sim


# -- two peers against each other ------------------------------------------------------


def test_bulk_both_ways_at_once_through_small_buffers_arrives_intact() -> None:
    sim = connected(SimRelay(capacity=4096, window=10_000, chunk=3000))
    up = bytes(range(256)) * 4000          # ~1 MB each way, far more than the buffers
    down = bytes(reversed(range(256))) * 4000
    sim.client.outgoing += up
    sim.server.outgoing += down
    sim.client.fin_sent = sim.server.fin_sent = True

    def readers() -> bool:
        moved = bool(sim.client.incoming or sim.server.incoming)
        sim.client.read_all(limit=1500)     # slow readers
        sim.server.read_all(limit=2500)
        return moved

    run(sim, [readers])
    assert sim.server.received == up and sim.client.received == down
    assert sim.max_pending <= 4096               # never more than the buffer
    assert sim.client.fin_received and sim.server.fin_received
    assert sim.conn.state is ConnState.CLOSED
    assert sim.actions[-1] == Finished(Outcome.DONE)
    assert sim.conn.up.total == len(up) and sim.conn.down.total == len(down)


def test_half_close_client_gets_the_whole_reply_after_its_fin() -> None:
    sim = connected(SimRelay(capacity=1000, chunk=300))
    request = b"x" * 5000
    reply = b"y" * 9000
    sim.client.outgoing += request
    sim.client.fin_sent = True                  # shutdown(SHUT_WR) right after the request
    replied = False

    def server() -> bool:                       # reads everything, then answers and closes
        nonlocal replied
        sim.server.read_all()
        if sim.server.fin_received and not replied:
            replied = True
            sim.server.outgoing += reply
            sim.server.fin_sent = True
            return True
        return False

    def client() -> bool:
        moved = bool(sim.client.incoming)
        sim.client.read_all()
        return moved

    run(sim, [server, client])
    assert sim.server.received == request
    assert sim.client.received == reply
    assert sim.client.fin_received
    # FIN to the target came first, while the reply was still to come
    shutdowns = [a for a in sim.actions if isinstance(a, ShutdownWrite)]
    assert shutdowns == [ShutdownWrite(Side.TARGET), ShutdownWrite(Side.CLIENT)]
    assert sim.actions[-3:] == [Close(Side.CLIENT), Close(Side.TARGET), Finished(Outcome.DONE)]


def test_a_stalled_reader_stops_the_relay_reading_its_writer() -> None:
    sim = connected(SimRelay(capacity=2048, window=1000, chunk=512))
    sim.client.outgoing += b"z" * 100_000      # the server never reads
    run(sim, [])
    assert sim.conn.up.pending == 2048 and not sim.conn.up.wants_read()
    assert len(sim.server.incoming) == 1000    # its window is full
    assert len(sim.client.outgoing) == 100_000 - 3048   # the rest waits at the client
    sim.server.read_all()                      # the reader wakes up: reading resumes
    assert sim.step()
    assert sim.conn.up.wants_read() or len(sim.server.incoming) > 0


def test_eof_with_an_empty_buffer_is_passed_on_at_once() -> None:
    conn = TcpConnection(0.0, 10.0, 100)
    conn.connected()
    assert conn.eof(Direction.DOWN) == [ShutdownWrite(Side.CLIENT)]
    assert conn.down.state is HalfState.SHUT and conn.state is ConnState.RELAYING
    assert not conn.down.wants_read() and conn.up.wants_read()


def test_eof_with_pending_bytes_waits_for_them() -> None:
    conn = TcpConnection(0.0, 10.0, 100)
    conn.connected()
    conn.received(Direction.UP, 60)
    assert conn.eof(Direction.UP) == []
    assert conn.up.state is HalfState.DRAINING and conn.up.wants_write()
    assert conn.sent(Direction.UP, 50) == []
    assert conn.sent(Direction.UP, 10) == [ShutdownWrite(Side.TARGET)]
    assert conn.eof(Direction.DOWN) == [ShutdownWrite(Side.CLIENT), Close(Side.CLIENT),
                                        Close(Side.TARGET), Finished(Outcome.DONE)]


# -- resets and failures ---------------------------------------------------------------


@pytest.mark.parametrize("side", list(Side))
def test_a_reset_on_one_side_resets_the_other(side: Side) -> None:
    sim = connected(SimRelay(capacity=1000))
    sim.client.outgoing += b"a" * 5000
    sim.step()
    actions = sim.conn.reset(side, errno.ECONNRESET)
    assert actions == [Close(side), Abort(side.other), Finished(Outcome.RESET, errno.ECONNRESET)]
    assert sim.conn.closed
    assert all(h.state is HalfState.ABORTED and not h.wants_read() and not h.wants_write()
               for h in sim.conn.halves)
    # whatever the I/O layer still reports afterwards is ignored
    assert sim.conn.reset(side.other) == []
    assert sim.conn.fail() == []
    assert sim.conn.connect_failed(errno.ECONNREFUSED) == []
    assert sim.conn.tick(100.0) == []


def test_a_reset_after_a_half_close_still_resets() -> None:
    conn = TcpConnection(0.0, 10.0, 100)
    conn.connected()
    conn.eof(Direction.UP)
    assert conn.reset(Side.TARGET)[1] == Abort(Side.CLIENT)


def test_refused_target_resets_the_client() -> None:
    conn = TcpConnection(0.0, 10.0, 100)
    assert not conn.up.wants_read() or conn.state is ConnState.CONNECTING
    actions = conn.connect_failed(errno.ECONNREFUSED)
    assert actions == [Abort(Side.CLIENT), Close(Side.TARGET),
                       Finished(Outcome.REFUSED, errno.ECONNREFUSED)]
    assert Outcome.REFUSED.is_error and conn.closed


def test_connect_timeout_follows_the_clock() -> None:
    conn = TcpConnection(now=100.0, connect_timeout=10.0, capacity=100)
    assert conn.tick(105.0) == []
    assert conn.tick(109.999) == []
    assert conn.tick(110.0) == [Abort(Side.CLIENT), Close(Side.TARGET),
                                Finished(Outcome.TIMEOUT)]
    assert conn.tick(200.0) == []


def test_the_clock_does_not_matter_once_connected() -> None:
    conn = TcpConnection(now=0.0, connect_timeout=1.0, capacity=100)
    conn.connected()
    assert conn.tick(1e9) == [] and conn.state is ConnState.RELAYING


def test_local_failure_resets_both_sides() -> None:
    conn = TcpConnection(0.0, 10.0, 100)
    conn.connected()
    assert conn.fail() == [Abort(Side.CLIENT), Abort(Side.TARGET), Finished(Outcome.ERROR)]
    assert Outcome.ERROR.is_error and not Outcome.RESET.is_error


# -- the state machines refuse what they do not allow ----------------------------------


def test_nothing_moves_before_the_target_is_connected() -> None:
    conn = TcpConnection(0.0, 10.0, 100)
    with pytest.raises(RelayStateError):
        conn.received(Direction.UP, 1)
    with pytest.raises(RelayStateError):
        conn.eof(Direction.UP)


def test_connected_twice_is_a_bug() -> None:
    conn = TcpConnection(0.0, 10.0, 100)
    conn.connected()
    with pytest.raises(RelayStateError, match="connected in state relaying"):
        conn.connected()


@pytest.mark.parametrize(("pending", "n"), [(0, 1), (10, 11), (10, 0)])
def test_sending_what_is_not_buffered_is_a_bug(pending: int, n: int) -> None:
    conn = TcpConnection(0.0, 10.0, 100)
    conn.connected()
    if pending:
        conn.received(Direction.DOWN, pending)
    with pytest.raises(RelayStateError):
        conn.sent(Direction.DOWN, n)


def test_receiving_beyond_the_capacity_is_a_bug() -> None:
    conn = TcpConnection(0.0, 10.0, 100)
    conn.connected()
    conn.received(Direction.UP, 100)
    assert not conn.up.wants_read()
    with pytest.raises(RelayStateError):
        conn.received(Direction.UP, 1)


def test_eof_twice_is_a_bug() -> None:
    conn = TcpConnection(0.0, 10.0, 100)
    conn.connected()
    conn.eof(Direction.UP)
    with pytest.raises(RelayStateError, match="eof in state shut"):
        conn.eof(Direction.UP)


def test_half_transition_table_is_exactly_what_the_docstring_says() -> None:
    allowed = set(_HALF_TRANSITIONS)
    for state, event in itertools.product(HalfState, _HalfEvent):
        half = Half(Direction.UP, 10)
        half.state = state
        if (state, event) in allowed:
            half._step(event)
            assert half.state is _HALF_TRANSITIONS[state, event]
        else:
            with pytest.raises(RelayStateError):
                half._step(event)
    assert {_HALF_TRANSITIONS[k] for k in allowed if k[1] is _HalfEvent.RESET} == {
        HalfState.ABORTED}


def test_connection_transition_table_ends_in_closed() -> None:
    terminal = {after for (_before, event), after in _CONN_TRANSITIONS.items()
                if event is not _ConnEvent.CONNECTED}
    assert terminal == {ConnState.CLOSED}
    assert not any(state is ConnState.CLOSED for state, _ in _CONN_TRANSITIONS)


def test_directions_and_sides() -> None:
    assert Direction.UP.source is Side.CLIENT and Direction.UP.sink is Side.TARGET
    assert Direction.DOWN.source is Side.TARGET and Direction.DOWN.sink is Side.CLIENT
    assert Side.CLIENT.other is Side.TARGET
    with pytest.raises(ValueError):
        Half(Direction.UP, 0)


# -- idle timeout ----------------------------------------------------------------------


def relaying(idle: float, now: float = 0.0) -> TcpConnection:
    conn = TcpConnection(now=now, connect_timeout=10.0, capacity=100, idle_timeout=idle)
    conn.connected(now)
    return conn


def test_an_idle_connection_is_closed_on_both_sides_after_its_timeout() -> None:
    conn = relaying(30.0, now=100.0)
    assert conn.due() == 130.0
    assert conn.tick(129.9) == []
    assert conn.tick(130.0) == [Close(Side.CLIENT), Close(Side.TARGET), Finished(Outcome.IDLE)]
    assert conn.closed and conn.due() is None and not Outcome.IDLE.is_error
    assert conn.tick(500.0) == [] and conn.reset(Side.CLIENT) == []


def test_activity_moves_the_idle_deadline() -> None:
    conn = relaying(30.0)
    conn.received(Direction.UP, 10)
    conn.sent(Direction.UP, 10)
    conn.active(25.0)
    assert conn.tick(30.0) == [] and conn.due() == 55.0
    assert conn.tick(55.0)[-1] == Finished(Outcome.IDLE)


def test_idle_with_bytes_stuck_in_a_buffer_resets_both_sides() -> None:
    conn = relaying(5.0)
    conn.received(Direction.DOWN, 40)     # the client does not read: nothing moves
    assert conn.tick(5.0) == [Abort(Side.CLIENT), Abort(Side.TARGET), Finished(Outcome.IDLE)]
    assert all(h.state is HalfState.ABORTED for h in conn.halves)


def test_idle_after_a_half_close_still_closes() -> None:
    conn = relaying(5.0)
    assert conn.eof(Direction.UP) == [ShutdownWrite(Side.TARGET)]
    assert conn.tick(6.0)[-1] == Finished(Outcome.IDLE)


def test_no_idle_timeout_never_closes_and_connecting_keeps_its_own_deadline() -> None:
    forever = relaying(0.0)
    assert forever.tick(1e12) == [] and forever.due() is None
    connecting = TcpConnection(now=0.0, connect_timeout=10.0, capacity=100, idle_timeout=1.0)
    assert connecting.due() == 10.0 and connecting.tick(5.0) == []
    assert connecting.tick(10.0)[-1] == Finished(Outcome.TIMEOUT)
    with pytest.raises(ValueError):
        TcpConnection(now=0.0, connect_timeout=1.0, capacity=1, idle_timeout=-1.0)


def test_idle_in_the_simulation_only_after_both_peers_stop() -> None:
    sim = SimRelay(capacity=1000)
    sim.conn = TcpConnection(now=0.0, connect_timeout=10.0, capacity=1000, idle_timeout=2.0)
    connected(sim)
    sim.client.outgoing += b"x" * 5000
    clock = 0.0

    def server() -> bool:
        sim.server.read_all()
        return False

    for _ in range(20):           # one step a second, bytes moving: never idle
        clock += 1.0
        if sim.step():
            sim.conn.active(clock)
        server()
        assert sim.conn.tick(clock) == [] or sim.conn.closed
        if not sim.client.outgoing and not any(h.pending for h in sim.conn.halves):
            break
    assert bytes(sim.server.received) == b"x" * 5000 and not sim.conn.closed
    assert sim.conn.tick(clock + 2.0)[-1] == Finished(Outcome.IDLE)
