"""portproxy.udp: the sans-IO flow table, driven by datagrams and a fake clock."""

from __future__ import annotations

import itertools

import pytest

from portproxy.udp import (
    _FLOW_TRANSITIONS,
    CloseFlow,
    CloseReason,
    Flow,
    FlowState,
    FlowTable,
    OpenFlow,
    _FlowEvent,
)

A = ("192.0.2.1", 5000)
B = ("192.0.2.2", 5000)
C = ("192.0.2.1", 5001)


def test_first_datagram_opens_a_flow_next_ones_reuse_it() -> None:
    table = FlowTable(idle_timeout=90.0, max_flows=10)
    flow, actions = table.from_client(A, now=1.0)
    assert actions == [OpenFlow(flow)]
    assert flow.client == A and flow.created == 1.0 and flow.state is FlowState.OPEN
    again, actions = table.from_client(A, now=2.0)
    assert again is flow and actions == []
    assert flow.datagrams_in == 2 and flow.last_active == 2.0
    assert len(table) == 1 and table.opened == 1 and table.get(A) is flow


def test_flows_are_per_client_address_and_port() -> None:
    table = FlowTable()
    flows = {table.from_client(addr, 0.0)[0] for addr in (A, B, C)}
    assert len(flows) == 3 and len(table) == 3


def test_idle_flow_expires_after_the_timeout_not_before() -> None:
    table = FlowTable(idle_timeout=90.0)
    flow, _ = table.from_client(A, now=10.0)
    assert table.next_expiry() == 100.0
    assert table.expire(99.9) == []
    assert table.expire(100.0) == [CloseFlow(flow, CloseReason.IDLE)]
    assert flow.state is FlowState.CLOSED and len(table) == 0
    assert table.next_expiry() is None


def test_replies_keep_a_flow_alive() -> None:
    table = FlowTable(idle_timeout=10.0)
    flow, _ = table.from_client(A, now=0.0)
    for t in range(5, 50, 5):
        assert table.from_target(flow, now=float(t))
        assert table.expire(float(t)) == []
    assert flow.datagrams_out == 9
    assert table.next_expiry() == 55.0


def test_expiry_takes_only_the_idle_flows_oldest_first() -> None:
    table = FlowTable(idle_timeout=10.0)
    a, _ = table.from_client(A, 0.0)
    b, _ = table.from_client(B, 1.0)
    c, _ = table.from_client(C, 2.0)
    table.from_client(A, 5.0)                    # A is busy again: now the newest
    assert table.expire(11.5) == [CloseFlow(b, CloseReason.IDLE)]
    assert table.expire(12.0) == [CloseFlow(c, CloseReason.IDLE)]
    assert [f.client for f in table] == [A] and a.state is FlowState.OPEN


def test_full_table_evicts_the_least_recently_active_flow() -> None:
    table = FlowTable(idle_timeout=90.0, max_flows=2)
    a, _ = table.from_client(A, 0.0)
    b, _ = table.from_client(B, 1.0)
    table.from_target(a, 2.0)                    # a reply makes A newer than B
    c, actions = table.from_client(C, 3.0)
    assert actions == [CloseFlow(b, CloseReason.EVICTED), OpenFlow(c)]
    assert b.state is FlowState.CLOSED and len(table) == 2
    assert table.get(B) is None and table.get(A) is a


def test_a_datagram_for_a_closed_flow_is_dropped() -> None:
    table = FlowTable(idle_timeout=1.0)
    flow, _ = table.from_client(A, 0.0)
    table.expire(5.0)
    assert not table.from_target(flow, 5.0)
    assert flow.datagrams_out == 0


def test_a_client_coming_back_after_expiry_gets_a_new_flow() -> None:
    table = FlowTable(idle_timeout=1.0)
    old, _ = table.from_client(A, 0.0)
    table.expire(1.0)
    new, actions = table.from_client(A, 2.0)
    assert new is not old and actions == [OpenFlow(new)] and table.opened == 2


def test_remove_and_clear_are_idempotent() -> None:
    table = FlowTable()
    a, _ = table.from_client(A, 0.0)
    b, _ = table.from_client(B, 0.0)
    assert table.remove(a) == [CloseFlow(a, CloseReason.REMOVED)]
    assert table.remove(a) == []
    assert table.clear() == [CloseFlow(b, CloseReason.REMOVED)]
    assert table.clear() == [] and len(table) == 0


def test_handle_is_left_to_the_io_layer() -> None:
    table = FlowTable()
    flow, _ = table.from_client(A, 0.0)
    assert flow.handle is None
    flow.handle = object()
    assert table.remove(flow)[0].flow.handle is flow.handle


@pytest.mark.parametrize(("idle", "cap"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_bad_limits_are_refused(idle: float, cap: int) -> None:
    with pytest.raises(ValueError):
        FlowTable(idle_timeout=idle, max_flows=cap)


def test_flow_transition_table_is_exactly_what_the_docstring_says() -> None:
    for state, event in itertools.product(FlowState, _FlowEvent):
        flow = Flow(A, 0.0, 0.0, state=state)
        if (state, event) in _FLOW_TRANSITIONS:
            flow._step(event)
            assert flow.state is _FLOW_TRANSITIONS[state, event]
        else:
            with pytest.raises(RuntimeError):
                flow._step(event)
