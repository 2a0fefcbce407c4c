"""Sans-IO UDP flow table: datagrams and a clock in, flow openings and closings out.

Theory of operation
-------------------
UDP has no connections, so the relay makes *flows*: one per client address (the source
``(host, port)`` of the datagrams reaching the listening socket).  The I/O layer opens,
for each flow, a socket connected to the target; the client's datagrams go out on it,
and what the target answers on it goes back to that client from the listening socket.

The table keeps flows in order of last activity (a datagram either way refreshes a
flow).  That order gives both limits at constant cost per event:

* a flow idle for ``idle_timeout`` seconds (default 90, as docker-proxy) is closed by
  :meth:`FlowTable.expire`, which the I/O layer calls at :meth:`FlowTable.next_expiry`;
* when a new client would exceed ``max_flows``, the least recently active flow is
  evicted first.

Flow transitions (the table below is the whole truth)::

    OPEN --datagram either way--> OPEN
    OPEN --idle | evicted | removed--> CLOSED

The table never touches a socket: :class:`OpenFlow` and :class:`CloseFlow` tell the I/O
layer what to open and close, and :attr:`Flow.handle` is where it keeps its socket.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_FLOWS",
    "CloseFlow",
    "CloseReason",
    "Flow",
    "FlowAction",
    "FlowState",
    "FlowTable",
    "OpenFlow",
]

DEFAULT_IDLE_TIMEOUT = 90.0
DEFAULT_MAX_FLOWS = 4096


class FlowState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class CloseReason(enum.Enum):
    IDLE = "idle"          # no datagram either way for idle_timeout seconds
    EVICTED = "evicted"    # the table was full and this flow was the least recently active
    REMOVED = "removed"    # the I/O layer asked (its socket failed, or the relay stops)


class _FlowEvent(enum.Enum):
    DATAGRAM = "datagram"
    IDLE = "idle"
    EVICT = "evict"
    REMOVE = "remove"


_FLOW_TRANSITIONS: dict[tuple[FlowState, _FlowEvent], FlowState] = {
    (FlowState.OPEN, _FlowEvent.DATAGRAM): FlowState.OPEN,
    (FlowState.OPEN, _FlowEvent.IDLE): FlowState.CLOSED,
    (FlowState.OPEN, _FlowEvent.EVICT): FlowState.CLOSED,
    (FlowState.OPEN, _FlowEvent.REMOVE): FlowState.CLOSED,
}


@dataclass(eq=False, slots=True)
class Flow:
    """One client of a UDP relay.  ``handle`` belongs to the I/O layer (its socket)."""

    client: Hashable
    created: float
    last_active: float
    state: FlowState = FlowState.OPEN
    datagrams_in: int = 0     # client -> target
    datagrams_out: int = 0    # target -> client
    handle: object | None = field(default=None, repr=False)

    def _step(self, event: _FlowEvent) -> None:
        try:
            self.state = _FLOW_TRANSITIONS[self.state, event]
        except KeyError:
            raise RuntimeError(f"flow {self.client}: {event.value} in state "
                               f"{self.state.value}") from None


@dataclass(frozen=True, slots=True)
class OpenFlow:
    """Open the flow's socket towards the target (before sending its first datagram)."""

    flow: Flow


@dataclass(frozen=True, slots=True)
class CloseFlow:
    """Close the flow's socket."""

    flow: Flow
    reason: CloseReason


FlowAction = OpenFlow | CloseFlow


class FlowTable:
    """Flows by client address, least recently active first."""

    def __init__(self, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 max_flows: int = DEFAULT_MAX_FLOWS) -> None:
        if idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive, not {idle_timeout}")
        if max_flows < 1:
            raise ValueError(f"max_flows must be at least 1, not {max_flows}")
        self.idle_timeout = idle_timeout
        self.max_flows = max_flows
        self.opened = 0       # flows opened since the start
        self._flows: OrderedDict[Hashable, Flow] = OrderedDict()

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[Flow]:
        return iter(list(self._flows.values()))

    def get(self, client: Hashable) -> Flow | None:
        return self._flows.get(client)

    def from_client(self, client: Hashable, now: float) -> tuple[Flow, list[FlowAction]]:
        """A datagram from ``client``: its flow, and what to do before forwarding it."""
        flow = self._flows.get(client)
        if flow is not None:
            flow._step(_FlowEvent.DATAGRAM)
            flow.last_active = now
            flow.datagrams_in += 1
            self._flows.move_to_end(client)
            return flow, []
        actions: list[FlowAction] = []
        while len(self._flows) >= self.max_flows:
            _, oldest = self._flows.popitem(last=False)
            oldest._step(_FlowEvent.EVICT)
            actions.append(CloseFlow(oldest, CloseReason.EVICTED))
        flow = Flow(client, created=now, last_active=now, datagrams_in=1)
        self._flows[client] = flow
        self.opened += 1
        actions.append(OpenFlow(flow))
        return flow, actions

    def from_target(self, flow: Flow, now: float) -> bool:
        """A datagram for ``flow``'s client; False if the flow is closed (drop it)."""
        if flow.state is FlowState.CLOSED:
            return False
        flow._step(_FlowEvent.DATAGRAM)
        flow.last_active = now
        flow.datagrams_out += 1
        self._flows.move_to_end(flow.client)
        return True

    def next_expiry(self) -> float | None:
        """When the least recently active flow expires, or None without flows."""
        for flow in self._flows.values():
            return flow.last_active + self.idle_timeout
        return None

    def expire(self, now: float) -> list[FlowAction]:
        """Close the flows idle for ``idle_timeout`` or longer at ``now``."""
        actions: list[FlowAction] = []
        while self._flows:
            flow = next(iter(self._flows.values()))
            if flow.last_active + self.idle_timeout > now:
                break
            del self._flows[flow.client]
            flow._step(_FlowEvent.IDLE)
            actions.append(CloseFlow(flow, CloseReason.IDLE))
        return actions

    def remove(self, flow: Flow) -> list[FlowAction]:
        """Close ``flow`` at the I/O layer's request; nothing if it is closed already."""
        if flow.state is FlowState.CLOSED:
            return []
        del self._flows[flow.client]
        flow._step(_FlowEvent.REMOVE)
        return [CloseFlow(flow, CloseReason.REMOVED)]

    def clear(self) -> list[FlowAction]:
        """Close every flow (the relay stops)."""
        actions: list[FlowAction] = []
        for flow in list(self._flows.values()):
            actions += self.remove(flow)
        return actions
