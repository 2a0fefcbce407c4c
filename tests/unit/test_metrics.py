"""The counters' pure parts: the histogram, the status rows' counters, the metric families
built from a status snapshot, and the --metrics address."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from hns.daemon.counters import dns_counters, relay_counters
from hns.daemon.metrics import StatusCollector, families, parse_address
from hns.errors import InvalidRequest
from portproxy._relay import RelayInfo
from portproxy.histogram import DNS_BUCKETS, Histogram


def test_histogram_buckets_are_cumulative_and_end_with_inf() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 2.0, -1.0):
        h.observe(value)
    assert h.cumulative() == [(0.1, 3), (1.0, 4), (math.inf, 5)]
    assert h.count == 5 and h.sum == pytest.approx(2.65)
    assert h.to_json()["Buckets"] == {"0.1": 3, "1.0": 4, "+Inf": 5}


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False)))
def test_histogram_counts_every_observation_once(values: list[float]) -> None:
    h = Histogram()
    for v in values:
        h.observe(v)
    cumulative = h.cumulative()
    assert cumulative[-1] == (math.inf, len(values))
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(cumulative))
    for bound, count in cumulative:
        assert count == sum(1 for v in values if v <= bound)


@pytest.mark.parametrize("bounds", [(), (1.0, 1.0), (2.0, 1.0)])
def test_histogram_bounds_must_increase(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="increasing"):
        Histogram(bounds)


def test_relay_counters_of_an_info_and_of_none() -> None:
    info = RelayInfo("p", "tcp", ("127.0.0.1", 1), ("10.0.0.2", 2), 1, 5, 2, 1,
                     refused=3, bytes_up=100, bytes_down=2000, timeouts=1, unreachable=1)
    counts = relay_counters(info)
    assert counts == {"Connections": 1, "Accepted": 5, "BytesUp": 100, "BytesDown": 2000,
                      "Refused": 3, "Resets": 1, "TimedOut": 1, "Unreachable": 1,
                      "Errors": 2, "IdleClosed": 0}
    assert set(relay_counters(None).values()) == {0}
    assert dns_counters(None)["Latency"] is None


STATUS: dict[str, Any] = {
    "Running": True,
    "Relays": [{"Name": "v4tov4 tcp 0.0.0.0:6000", "Protocol": "tcp", "Connections": 2,
                "Accepted": 7, "BytesUp": 10, "BytesDown": 20, "Refused": 1, "Resets": 0,
                "TimedOut": 0, "Unreachable": 3, "Errors": 3, "IdleClosed": 0}],
    "Forwards": [{"Vm": "vm1", "Protocol": "tcp", "Listen": "127.0.0.1:80", "Port": 80,
                  "Connections": 0, "BytesUp": 5, "BytesDown": 6}],
    "Mirrored": [{"Vm": "m1", "Protocol": "udp", "Family": "ipv4", "Port": 53,
                  "Direction": "to vm", "BytesUp": 1, "BytesDown": 2}],
    "Dns": [{"Network": "nat", "Queries": 4, "Answers": 4, "Servfail": 1, "Failures": 1,
             "Malformed": 0, "Ignored": 2,
             "Latency": {"Count": 4, "Sum": 0.01,
                         "Buckets": {**{repr(b): 4 for b in DNS_BUCKETS}, "+Inf": 4}}}],
    "PortMappings": [{"Protocol": "tcp", "HostAddress": None, "ExternalPort": 8080,
                      "Target": "172.16.0.2:80", "Packets": 12, "Bytes": 3400}],
    "Healing": {"Rounds": 9, "ByKind": {"route": 2}},
}


def parsed(status: dict[str, Any]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The families rendered to text by prometheus_client and parsed back."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(lambda: status))
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_families_carry_every_counter_of_the_status() -> None:
    samples = parsed(STATUS)
    proxy = {("kind", "portproxy"), ("relay", "v4tov4 tcp 0.0.0.0:6000"), ("vm", ""),
             ("protocol", "tcp")}
    assert samples[("hns_relay_bytes_total", frozenset({*proxy, ("direction", "up")}))] == 10
    assert samples[("hns_relay_bytes_total", frozenset({*proxy, ("direction", "down")}))] \
        == 20
    assert samples[("hns_relay_connections", frozenset(proxy))] == 2
    assert samples[("hns_relay_unreachable_total", frozenset(proxy))] == 3
    forward = {("kind", "forward"), ("relay", "vm1 tcp 127.0.0.1:80"), ("vm", "vm1"),
               ("protocol", "tcp")}
    assert samples[("hns_relay_bytes_total", frozenset({*forward, ("direction", "down")}))] \
        == 6
    assert any(n == "hns_relay_bytes_total" and ("kind", "mirrored") in ls
               for n, ls in samples)
    nat = frozenset({("network", "nat")})
    assert samples[("hns_dns_servfail_total", nat)] == 1
    assert samples[("hns_dns_ignored_total", nat)] == 2
    assert samples[("hns_dns_latency_seconds_count", nat)] == 4
    assert samples[("hns_dns_latency_seconds_sum", nat)] == pytest.approx(0.01)
    mapping = frozenset({("protocol", "tcp"), ("host_address", ""), ("external_port", "8080"),
                         ("target", "172.16.0.2:80")})
    assert samples[("hns_portmap_packets_total", mapping)] == 12
    assert samples[("hns_portmap_bytes_total", mapping)] == 3400
    assert samples[("hns_heal_repairs_total", frozenset({("kind", "route")}))] == 2
    assert samples[("hns_daemon_up", frozenset())] == 1


def test_an_empty_status_still_says_the_daemon_is_up() -> None:
    samples = parsed({"Running": True})
    assert samples == {("hns_daemon_up", frozenset()): 1}
    assert next(f.name for f in families({})) == "hns_daemon_up"


@pytest.mark.parametrize(("text", "expected"), [
    ("9100", ("127.0.0.1", 9100)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("[::1]:9100", ("::1", 9100)),
    ("127.0.0.2:65535", ("127.0.0.2", 65535)),
])
def test_metrics_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "x", "0", "65536", ":80", "host:80", "::1:80",
                                  "[::1]", "1.2.3.4:-1", "1.2.3.4:0x50"])
def test_bad_metrics_addresses(text: str) -> None:
    with pytest.raises(InvalidRequest, match="--metrics"):
        parse_address(text)


def test_set_counters_as_nft_lists_them() -> None:
    from nat.nft import parse_set_counters
    listing = (
        '{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"set": {"family": "inet", '
        '"name": "pm_count", "table": "t", "type": ["ipv4_addr", "inet_proto", '
        '"inet_service"], "elem": [{"elem": {"val": {"concat": ["172.16.0.2", "tcp", 80]}, '
        '"counter": {"packets": 49, "bytes": 616964}}}, {"elem": {"val": {"concat": '
        '["172.16.0.3", "udp", 53]}, "counter": {"packets": 0, "bytes": 0}}}, '
        '"10.0.0.1"], "stmt": [{"counter": null}]}}]}')
    assert parse_set_counters(listing) == {("172.16.0.2", "tcp", "80"): (49, 616964),
                                           ("172.16.0.3", "udp", "53"): (0, 0)}
    assert parse_set_counters('{"nftables": []}') == {}


def test_the_settings_key_keeps_the_endpoint_in_one_form() -> None:
    from hns.settings import loads
    assert loads("[hns]\nmetrics = 9464\n").metrics == "127.0.0.1:9464"
    assert loads("[hns]\nmetrics = [::1]:9100\n").metrics == "[::1]:9100"
    assert loads("[hns]\nmetrics =\n").metrics is None
    assert loads("").metrics is None
    with pytest.raises(InvalidRequest, match="metrics"):
        loads("[hns]\nmetrics = 70000\n")
