"""The cluster view and the entries it asks of a host's VXLAN devices (pure)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

from hypothesis import given
from hypothesis import strategies as st

from hns.cluster.etcd import Event, KeyValue
from hns.cluster.records import (
    EndpointRecord,
    HostRecord,
    NetworkRecord,
    endpoint_key,
    host_key,
    network_key,
    overlay_mac,
)
from hns.cluster.view import ClusterView, Entries, diff, entries_for

VTEPS = {"a": IPv4Address("192.168.250.11"), "b": IPv4Address("192.168.250.12"),
         "c": IPv4Address("192.168.250.13")}


def _kv(key: str, record: object, revision: int = 1) -> KeyValue:
    return KeyValue(key, json.dumps(record.to_json()), revision, revision, 0)  # type: ignore[attr-defined]


def _endpoint(host: str, last: int, network: str = "O") -> EndpointRecord:
    ip = IPv4Address("10.240.0.0") + last
    return EndpointRecord(f"id-{network}-{last}", f"v{last}", network, ip, overlay_mac(ip),
                          host, VTEPS[host])


def _view(*endpoints: EndpointRecord) -> ClusterView:
    net = NetworkRecord("n1", "O", IPv4Network("10.240.0.0/16"), IPv4Address("10.240.0.1"),
                        4096, 1450)
    kvs = [_kv(network_key("O"), net), _kv(host_key("a"), HostRecord("a", VTEPS["a"], 3))]
    kvs += [_kv(endpoint_key(e.network, e.ip), e) for e in endpoints]
    return ClusterView.listed(kvs, 7)


def test_a_host_gets_entries_for_the_other_hosts_endpoints_only() -> None:
    view = _view(_endpoint("a", 2), _endpoint("b", 3), _endpoint("c", 4))
    want = entries_for(view, "O", "a")
    b, c = _endpoint("b", 3), _endpoint("c", 4)
    assert want.fdb == {(b.mac, VTEPS["b"]), (c.mac, VTEPS["c"])}
    assert want.neigh == {(b.ip, b.mac), (c.ip, c.mac)}
    assert want.count == 4


def test_the_listed_view_knows_its_records_and_revision() -> None:
    view = _view(_endpoint("b", 3))
    assert view.revision == 7
    assert set(view.networks()) == {"O"} and set(view.hosts()) == {"a"}
    assert [e.ip for e in view.endpoints("O")] == [IPv4Address("10.240.0.3")]
    assert view.endpoints("other") == []


def test_events_put_and_delete_endpoints() -> None:
    view = _view()
    ep = _endpoint("b", 5)
    view.apply(Event(False, _kv(endpoint_key("O", ep.ip), ep, 9)))
    assert entries_for(view, "O", "a").count == 2 and view.revision == 9
    view.apply(Event(True, KeyValue(endpoint_key("O", ep.ip), "", 10, 0, 0)))
    assert entries_for(view, "O", "a") == Entries() and view.revision == 10


def test_a_put_that_does_not_parse_drops_the_old_record() -> None:
    view = _view(_endpoint("b", 3))
    view.apply(Event(False, KeyValue(endpoint_key("O", IPv4Address("10.240.0.3")), "junk",
                                     8, 1, 0)))
    assert view.endpoints() == []


def test_a_diff_against_what_is_there_changes_only_what_differs() -> None:
    have = entries_for(_view(_endpoint("b", 3), _endpoint("c", 4)), "O", "a")
    want = entries_for(_view(_endpoint("b", 3), _endpoint("c", 6)), "O", "a")
    plan = diff(have, want)
    c4, c6 = _endpoint("c", 4), _endpoint("c", 6)
    assert plan.add_fdb == {(c6.mac, VTEPS["c"])} and plan.remove_fdb == {(c4.mac, VTEPS["c"])}
    assert plan.add_neigh == {(c6.ip, c6.mac)} and plan.remove_neigh == {(c4.ip, c4.mac)}
    assert diff(want, want).empty


endpoint_sets = st.sets(st.tuples(st.sampled_from("abc"), st.integers(2, 40)), max_size=12)


@given(endpoint_sets, endpoint_sets)
def test_applying_the_diff_gives_exactly_the_wanted_entries(first: set[tuple[str, int]],
                                                            second: set[tuple[str, int]]
                                                            ) -> None:
    def entries(spec: set[tuple[str, int]]) -> Entries:
        unique = {last: host for host, last in spec}     # one endpoint per address
        return entries_for(_view(*(_endpoint(h, n) for n, h in unique.items())), "O", "a")
    have, want = entries(first), entries(second)
    plan = diff(have, want)
    fdb = (have.fdb - plan.remove_fdb) | plan.add_fdb
    neigh = (have.neigh - plan.remove_neigh) | plan.add_neigh
    assert Entries(frozenset(fdb), frozenset(neigh)) == want
    assert diff(want, want).empty          # a second resync changes nothing
