"""The cluster's records and the values derived from them (pure)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hns.cluster.etcd import parse_endpoints, prefix_end
from hns.cluster.records import (
    MIN_VNI,
    EndpointRecord,
    HostRecord,
    NetworkRecord,
    endpoint_key,
    host_key,
    network_key,
    overlay_mac,
    parse_host_name,
    parse_record,
    parse_vni,
    pick_vni,
)
from hns.errors import InvalidRequest
from hns.model import parse_mac

NET = NetworkRecord("id-1", "O", IPv4Network("10.240.0.0/16"), IPv4Address("10.240.0.1"),
                    4096, 1450)
HOST = HostRecord("a", IPv4Address("192.168.250.11"), 10)
EP = EndpointRecord("vm-1", "v1", "O", IPv4Address("10.240.0.2"), "00:15:5d:f0:00:02", "a",
                    IPv4Address("192.168.250.11"))


@pytest.mark.parametrize("record", [NET, HOST, EP])
def test_records_round_trip_through_their_json(record: object) -> None:
    text = json.dumps(record.to_json())  # type: ignore[attr-defined]
    key = {NetworkRecord: network_key("O"), HostRecord: host_key("a"),
           EndpointRecord: endpoint_key("O", EP.ip)}[type(record)]
    assert parse_record(key, text) == record


def test_a_record_that_does_not_parse_is_skipped() -> None:
    assert parse_record(network_key("O"), "{not json") is None
    assert parse_record(network_key("O"), json.dumps({"Name": "O"})) is None
    assert parse_record("/hns/v1/vnis/4096", "O") is None


def test_keys_nest_endpoints_under_their_network() -> None:
    assert endpoint_key("O", IPv4Address("10.240.0.2")) == "/hns/v1/endpoints/O/10.240.0.2"
    assert network_key("O") == "/hns/v1/networks/O"
    assert prefix_end("/hns/v1/") == "/hns/v10"


def test_the_json_has_hns_field_names() -> None:
    assert NET.to_json()["Type"] == "Overlay"
    assert EP.to_json()["Vtep"] == "192.168.250.11"
    assert HOST.to_json()["Vtep"] == HOST.to_json()["Address"]


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_an_overlay_mac_is_unicast_and_follows_the_low_24_bits(value: int) -> None:
    ip = IPv4Address(value)
    mac = overlay_mac(ip)
    assert parse_mac(mac) == mac and mac.startswith("00:15:5d:")
    assert int(mac[9:].replace(":", ""), 16) == value & 0xFFFFFF


def test_two_addresses_of_one_slash8_get_distinct_macs() -> None:
    macs = {overlay_mac(IPv4Address("10.0.0.0") + i) for i in range(0, 2**24, 4099)}
    assert len(macs) == len(range(0, 2**24, 4099))


def test_pick_vni_takes_the_lowest_free_from_4096() -> None:
    assert pick_vni([]) == MIN_VNI
    assert pick_vni([4096, 4097, 4099]) == 4098
    assert pick_vni([1, 2]) == MIN_VNI


@pytest.mark.parametrize("text", ["0", "-1", "16777216", "x", "", "4096 ", "٤"])
def test_parse_vni_refuses_what_is_not_a_vni(text: str) -> None:
    if text == "4096 ":
        assert parse_vni(text) == 4096
        return
    with pytest.raises(InvalidRequest, match="invalid VNI"):
        parse_vni(text)


@pytest.mark.parametrize("name", ["a", "host-1", "h.example", "A_1"])
def test_host_names_accepted(name: str) -> None:
    assert parse_host_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", "a b", "a/b", "x" * 64, "hé"])
def test_host_names_refused(name: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid host name"):
        parse_host_name(name)


def test_parse_endpoints_gives_base_urls() -> None:
    assert parse_endpoints("http://10.0.0.1:2379/, http://b:2380") == (
        "http://10.0.0.1:2379", "http://b:2380")


@pytest.mark.parametrize("text", ["", " , ", "10.0.0.1:2379", "https://a:2379",
                                  "http://a", "http://a:99999", "http://a:2379/v3",
                                  "ftp://a:21", "http://:2379"])
def test_parse_endpoints_refuses_what_is_not_an_http_endpoint(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_endpoints(text)
