"""Sans-IO state of one relayed TCP connection: events in, actions out, no sockets.

Theory of operation
-------------------
A relayed connection joins two sockets, the *client* (accepted) and the *target* (dialed),
and carries bytes in two independent *halves*: ``UP`` (client -> target) and ``DOWN``
(target -> client).  Each half owns a bounded buffer in the I/O layer (a pipe for
``splice(2)`` or a bytearray); this module knows only how many bytes it holds
(``pending``) and how many it may hold (``capacity``).

The I/O layer asks :meth:`Half.wants_read` before reading a half's source and
:meth:`Half.wants_write` before writing its sink, reports what happened (``received``,
``sent``, ``eof``, ``reset``, ``connected``, ``connect_failed``, ``tick``, ``active``) and
carries out the actions returned, in order.  Backpressure falls out of ``wants_read``: a half whose
buffer is full stops reading its source until the sink has taken some bytes, so a slow
reader never grows memory; the kernel's TCP window then slows the sender.

Transitions (the tables below are the whole truth)::

    half:        OPEN --eof--> DRAINING --flushed--> SHUT      (FIN passed on)
                 any live state --reset--> ABORTED
    connection:  CONNECTING --connected--> RELAYING --both halves SHUT--> CLOSED
                 CONNECTING --failed | timeout | reset--> CLOSED
                 RELAYING --reset | error | idle--> CLOSED

Contracts and hazards:

* EOF is passed on as ``ShutdownWrite`` only once the half's buffer is empty: the peer
  sees every byte, then the FIN.  The connection ends when both halves are SHUT.
* A reset (ECONNRESET, EPIPE, ...) on one side resets the other (``Abort``: SO_LINGER
  {1, 0} then close) whatever is still buffered: a reset means the stream is broken.
* Nothing is read before the target is connected; a refused, unreachable or timed-out
  target aborts the client.
* With an idle timeout, a connection that moved no byte either way (nor a FIN) for that
  long is closed on the next ``tick``: both sides closed gracefully when nothing is
  buffered, reset when bytes are (they could never be delivered whole).  The I/O layer
  reports movement with ``active(now)``; ``due()`` says when a ``tick`` may matter.
* Every event after CLOSED is ignored (returns no action): the I/O layer may report the
  errors of a socket it is tearing down without special cases.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "Abort",
    "Action",
    "Close",
    "ConnState",
    "Direction",
    "Finished",
    "Half",
    "HalfState",
    "Outcome",
    "RelayStateError",
    "ShutdownWrite",
    "Side",
    "TcpConnection",
]


class RelayStateError(RuntimeError):
    """An event that the state machine does not allow in its current state (a bug)."""


class Side(enum.IntEnum):
    """One of the two sockets of a connection."""

    CLIENT = 0
    TARGET = 1

    @property
    def other(self) -> Side:
        return Side(1 - self)


class Direction(enum.IntEnum):
    """A half, named by where its bytes go.  ``UP`` reads the client, writes the target."""

    UP = 0
    DOWN = 1

    @property
    def source(self) -> Side:
        return Side(self.value)

    @property
    def sink(self) -> Side:
        return Side(1 - self.value)


class HalfState(enum.Enum):
    OPEN = "open"            # reading the source, writing the sink
    DRAINING = "draining"    # source gave EOF; buffered bytes still to be written
    SHUT = "shut"            # every byte written and the FIN passed on
    ABORTED = "aborted"      # reset: nothing more moves


class ConnState(enum.Enum):
    CONNECTING = "connecting"
    RELAYING = "relaying"
    CLOSED = "closed"


class Outcome(enum.Enum):
    """How a connection ended."""

    DONE = "done"            # both halves closed in order
    RESET = "reset"          # one side reset; the other was reset in turn
    REFUSED = "refused"      # the target refused or was unreachable
    TIMEOUT = "timeout"      # the target did not answer within the connect timeout
    ERROR = "error"          # an unexpected local failure; both sides reset
    IDLE = "idle"            # no byte moved for the idle timeout; both sides closed

    @property
    def is_error(self) -> bool:
        """Whether the relay counts it as an error (a target or local failure)."""
        return self in (Outcome.REFUSED, Outcome.TIMEOUT, Outcome.ERROR)


# -- actions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShutdownWrite:
    """``shutdown(SHUT_WR)`` on ``side``: pass a FIN on."""

    side: Side


@dataclass(frozen=True, slots=True)
class Abort:
    """Reset ``side``: SO_LINGER {1, 0}, then close."""

    side: Side


@dataclass(frozen=True, slots=True)
class Close:
    """Close ``side`` gracefully (or drop a socket that never connected)."""

    side: Side


@dataclass(frozen=True, slots=True)
class Finished:
    """The connection is over; release what it holds.  Always the last action."""

    outcome: Outcome
    errno: int = 0


Action = ShutdownWrite | Abort | Close | Finished


# -- transition tables -----------------------------------------------------------------


class _HalfEvent(enum.Enum):
    EOF = "eof"
    FLUSHED = "flushed"
    RESET = "reset"


class _ConnEvent(enum.Enum):
    CONNECTED = "connected"
    FAILED = "failed"
    TIMEOUT = "timeout"
    RESET = "reset"
    FINISHED = "finished"
    IDLE = "idle"


_HALF_TRANSITIONS: dict[tuple[HalfState, _HalfEvent], HalfState] = {
    (HalfState.OPEN, _HalfEvent.EOF): HalfState.DRAINING,
    (HalfState.DRAINING, _HalfEvent.FLUSHED): HalfState.SHUT,
    (HalfState.OPEN, _HalfEvent.RESET): HalfState.ABORTED,
    (HalfState.DRAINING, _HalfEvent.RESET): HalfState.ABORTED,
    (HalfState.SHUT, _HalfEvent.RESET): HalfState.ABORTED,
}

_CONN_TRANSITIONS: dict[tuple[ConnState, _ConnEvent], ConnState] = {
    (ConnState.CONNECTING, _ConnEvent.CONNECTED): ConnState.RELAYING,
    (ConnState.CONNECTING, _ConnEvent.FAILED): ConnState.CLOSED,
    (ConnState.CONNECTING, _ConnEvent.TIMEOUT): ConnState.CLOSED,
    (ConnState.CONNECTING, _ConnEvent.RESET): ConnState.CLOSED,
    (ConnState.RELAYING, _ConnEvent.RESET): ConnState.CLOSED,
    (ConnState.RELAYING, _ConnEvent.FINISHED): ConnState.CLOSED,
    (ConnState.RELAYING, _ConnEvent.IDLE): ConnState.CLOSED,
}


class Half:
    """One direction of a connection: its state and the fill level of its buffer."""

    __slots__ = ("capacity", "direction", "pending", "state", "total")

    def __init__(self, direction: Direction, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, not {capacity}")
        self.direction = direction
        self.capacity = capacity
        self.state = HalfState.OPEN
        self.pending = 0   # bytes read from the source, not yet written to the sink
        self.total = 0     # bytes written to the sink so far

    def wants_read(self) -> bool:
        """Whether the source may be read: open and room in the buffer."""
        return self.state is HalfState.OPEN and self.pending < self.capacity

    def wants_write(self) -> bool:
        """Whether there are bytes for the sink."""
        return self.pending > 0 and self.state is not HalfState.ABORTED

    def room(self) -> int:
        return self.capacity - self.pending

    def _step(self, event: _HalfEvent) -> None:
        try:
            self.state = _HALF_TRANSITIONS[self.state, event]
        except KeyError:
            raise RelayStateError(
                f"half {self.direction.name}: {event.value} in state {self.state.value}"
            ) from None

    def __repr__(self) -> str:
        return (f"Half({self.direction.name}, {self.state.value}, "
                f"{self.pending}/{self.capacity}, total={self.total})")


class TcpConnection:
    """The state of one relayed connection; see the module docstring.

    ``idle_timeout`` (seconds, 0: never) closes a connection that moved nothing for that
    long once it is relaying."""

    __slots__ = ("deadline", "halves", "idle_timeout", "last_active", "state")

    def __init__(self, now: float, connect_timeout: float, capacity: int,
                 idle_timeout: float = 0.0) -> None:
        if idle_timeout < 0:
            raise ValueError(f"idle_timeout must not be negative, not {idle_timeout}")
        self.state = ConnState.CONNECTING
        self.deadline = now + connect_timeout
        self.idle_timeout = idle_timeout
        self.last_active = now
        self.halves = (Half(Direction.UP, capacity), Half(Direction.DOWN, capacity))

    @property
    def up(self) -> Half:
        return self.halves[0]

    @property
    def down(self) -> Half:
        return self.halves[1]

    @property
    def closed(self) -> bool:
        return self.state is ConnState.CLOSED

    def _step(self, event: _ConnEvent) -> None:
        try:
            self.state = _CONN_TRANSITIONS[self.state, event]
        except KeyError:
            raise RelayStateError(
                f"connection: {event.value} in state {self.state.value}") from None

    # -- connecting --------------------------------------------------------------------

    def connected(self, now: float | None = None) -> list[Action]:
        """The target accepted the connection: start moving bytes (idle from ``now``)."""
        self._step(_ConnEvent.CONNECTED)
        if now is not None:
            self.last_active = now
        return []

    def connect_failed(self, errno: int) -> list[Action]:
        """The target refused or is unreachable: reset the client."""
        if self.closed:
            return []
        self._step(_ConnEvent.FAILED)
        return [Abort(Side.CLIENT), Close(Side.TARGET), Finished(Outcome.REFUSED, errno)]

    def tick(self, now: float) -> list[Action]:
        """The clock moved: a connection still connecting past its deadline times out; one
        relaying and idle for its idle timeout is closed."""
        if self.state is ConnState.RELAYING:
            if not self.idle_timeout or now < self.last_active + self.idle_timeout:
                return []
            self._step(_ConnEvent.IDLE)
            buffered = any(h.pending for h in self.halves)
            self._abort_halves()
            end: type[Abort] | type[Close] = Abort if buffered else Close
            return [end(Side.CLIENT), end(Side.TARGET), Finished(Outcome.IDLE)]
        if self.state is not ConnState.CONNECTING or now < self.deadline:
            return []
        self._step(_ConnEvent.TIMEOUT)
        return [Abort(Side.CLIENT), Close(Side.TARGET), Finished(Outcome.TIMEOUT)]

    def active(self, now: float) -> None:
        """Bytes (or a FIN) moved at ``now``: the idle clock starts again."""
        self.last_active = now

    def due(self) -> float | None:
        """When ``tick`` may next end the connection (connect deadline or idle timeout)."""
        if self.state is ConnState.CONNECTING:
            return self.deadline
        if self.state is ConnState.RELAYING and self.idle_timeout:
            return self.last_active + self.idle_timeout
        return None

    # -- relaying ----------------------------------------------------------------------

    def received(self, direction: Direction, n: int) -> None:
        """``n`` bytes came from the source of ``direction`` into its buffer."""
        half = self.halves[direction]
        if (half.state is not HalfState.OPEN or self.state is not ConnState.RELAYING
                or not 0 < n <= half.capacity - half.pending):
            raise RelayStateError(f"received {n} bytes into {half!r} while {self.state.value}")
        half.pending += n

    def sent(self, direction: Direction, n: int) -> list[Action]:
        """``n`` buffered bytes of ``direction`` were written to its sink."""
        half = self.halves[direction]
        if not 0 < n <= half.pending or not half.wants_write():
            raise RelayStateError(f"sent {n} bytes from {half!r}")
        half.pending -= n
        half.total += n
        if half.pending == 0 and half.state is HalfState.DRAINING:
            return self._flushed(half)
        return []

    def eof(self, direction: Direction) -> list[Action]:
        """The source of ``direction`` has no more bytes (a FIN was read)."""
        half = self.halves[direction]
        if self.state is not ConnState.RELAYING:
            raise RelayStateError(f"eof on {half!r} while {self.state.value}")
        half._step(_HalfEvent.EOF)
        if half.pending == 0:
            return self._flushed(half)
        return []

    def resize(self, direction: Direction, capacity: int) -> None:
        """The buffer of ``direction`` now holds up to ``capacity`` bytes (the I/O layer
        switched it from a pipe to a copy buffer); it must hold what is pending."""
        half = self.halves[direction]
        if capacity < max(half.pending, 1):
            raise RelayStateError(f"resize {half!r} to {capacity}")
        half.capacity = capacity

    def _flushed(self, half: Half) -> list[Action]:
        half._step(_HalfEvent.FLUSHED)
        actions: list[Action] = [ShutdownWrite(half.direction.sink)]
        if all(h.state is HalfState.SHUT for h in self.halves):
            self._step(_ConnEvent.FINISHED)
            actions += [Close(Side.CLIENT), Close(Side.TARGET), Finished(Outcome.DONE)]
        return actions

    # -- failures ----------------------------------------------------------------------

    def reset(self, side: Side, errno: int = 0) -> list[Action]:
        """``side`` reset (or failed on a read or write): reset the other side too."""
        if self.closed:
            return []
        self._step(_ConnEvent.RESET)
        self._abort_halves()
        return [Close(side), Abort(side.other), Finished(Outcome.RESET, errno)]

    def fail(self) -> list[Action]:
        """An unexpected local failure: reset both sides."""
        if self.closed:
            return []
        self.state = ConnState.CLOSED
        self._abort_halves()
        return [Abort(Side.CLIENT), Abort(Side.TARGET), Finished(Outcome.ERROR)]

    def _abort_halves(self) -> None:
        for half in self.halves:
            if half.state is not HalfState.ABORTED:
                half._step(_HalfEvent.RESET)

    def __repr__(self) -> str:
        return f"TcpConnection({self.state.value}, {self.up!r}, {self.down!r})"
