"""hns.model: parsing of user input and the JSON shapes of networks and VMs."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from hns.errors import InvalidRequest
from hns.model import (
    Network,
    NetworkType,
    Vm,
    parse_ipv4,
    parse_mac,
    parse_mtu,
    parse_name,
    parse_subnet,
)

NET_ID = "0b7e3c1a-5d2f-4e6a-9b8c-1d2e3f405162"
VM_ID = "9f8e7d6c-5b4a-4321-8765-0fedcba98765"


def make_network() -> Network:
    return Network(id=NET_ID, name="WSL", type=NetworkType.NAT,
                   subnet=IPv4Network("172.16.0.0/20"), gateway=IPv4Address("172.16.0.1"),
                   mtu=1500, bridge="hbab120b7e3c1a")


def make_vm() -> Vm:
    return Vm(id=VM_ID, name="wsl", network="WSL", network_id=NET_ID, netns="hns-ab12-wsl",
              ip=IPv4Address("172.16.0.2"), prefixlen=20, gateway=IPv4Address("172.16.0.1"),
              mac="00:15:5d:aa:bb:cc", host_ifname="hvab129f8e7d6c", mtu=1500)


# parse_name


@pytest.mark.parametrize("name", [
    "a", "WSL", "wsl", "0net", "a-b_c.d", "net.", "x" * 32, "A" + "9" * 31,
])
def test_parse_name_accepts(name: str) -> None:
    assert parse_name(name) == name


@pytest.mark.parametrize("name", [
    "", "x" * 33, "_x", "-x", ".x", "..", "bad name!", "a b", "a/b", "../etc", "a\n",
    "a;b", 'a"b', "a'b", "a{b", "a\tb", "ä", "net\u0660", "a:b", "a@b",
])
def test_parse_name_refuses(name: str) -> None:
    with pytest.raises(InvalidRequest, match="letters, digits"):
        parse_name(name)


def test_parse_name_message_says_what() -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        parse_name("bad name!", "network name")
    assert str(excinfo.value).startswith("invalid network name 'bad name!':")
    assert "\n" not in str(excinfo.value)


# parse_subnet


@pytest.mark.parametrize("text", [
    "10.0.0.0/8", "10.50.0.0/24", "10.50.0.0/30", "172.16.0.0/12", "172.31.240.0/20",
    "192.168.0.0/16", "192.168.1.0/24", "100.64.0.0/10", "100.127.0.0/16",
])
def test_parse_subnet_accepts_private_ranges(text: str) -> None:
    assert parse_subnet(text) == IPv4Network(text)


@pytest.mark.parametrize(("text", "words"), [
    ("garbage", "does not appear"),
    ("10.50.0.0/33", "invalid subnet"),
    ("10.50.0.1/24", "host bits"),
    ("10.50.0.0/31", "too small"),
    ("10.50.0.0/32", "too small"),
    ("10.50.0.0", "too small"),
    ("8.8.8.0/24", "private range"),
    ("0.0.0.0/0", "private range"),
    ("172.0.0.0/8", "private range"),         # contains a private range, is not one
    ("172.32.0.0/16", "private range"),
    ("fd00::/64", "IPv4 only"),
])
def test_parse_subnet_refuses(text: str, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words) as excinfo:
        parse_subnet(text)
    assert str(excinfo.value).startswith(f"invalid subnet {text!r}")


# parse_ipv4


@pytest.mark.parametrize("text", ["10.0.0.1", "172.16.0.2", "0.0.0.0", "255.255.255.255"])
def test_parse_ipv4_accepts(text: str) -> None:
    assert parse_ipv4(text) == IPv4Address(text)


@pytest.mark.parametrize(("text", "words"), [
    ("10.0.0.256", "not an IP address"),
    ("abc", "not an IP address"),
    ("", "not an IP address"),
    ("10.0.0.1/24", "not an IP address"),
    ("010.0.0.1", "not an IP address"),
    ("fd00::1", "IPv4 only"),
])
def test_parse_ipv4_refuses(text: str, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words) as excinfo:
        parse_ipv4(text, "gateway")
    assert str(excinfo.value).startswith(f"invalid gateway {text!r}")


# parse_mac


@pytest.mark.parametrize(("text", "expected"), [
    ("00:15:5d:aa:bb:cc", "00:15:5d:aa:bb:cc"),
    ("00:15:5D:AA:BB:CC", "00:15:5d:aa:bb:cc"),
    ("00-15-5D-AA-BB-CC", "00:15:5d:aa:bb:cc"),
    ("02-00-00-00-00-01", "02:00:00:00:00:01"),
    (" 00:15:5d:aa:bb:cc\n", "00:15:5d:aa:bb:cc"),
])
def test_parse_mac_normalises(text: str, expected: str) -> None:
    assert parse_mac(text) == expected


@pytest.mark.parametrize(("text", "words"), [
    ("01:00:5e:00:00:01", "multicast"),
    ("ff:ff:ff:ff:ff:ff", "multicast"),
    ("33:33:00:00:00:01", "multicast"),
    ("00:00:00:00:00:00", "all zeros"),
    ("00-00-00-00-00-00", "all zeros"),
    ("", "six hex bytes"),
    ("garbage", "six hex bytes"),
    ("00:15:5d:aa:bb", "six hex bytes"),
    ("00:15:5d:aa:bb:cc:dd", "six hex bytes"),
    ("00:15:5d:aa:bb:gg", "six hex bytes"),
    ("0015.5daa.bbcc", "six hex bytes"),
    ("00155daabbcc", "six hex bytes"),
    ("0:15:5d:aa:bb:cc", "six hex bytes"),
    ("00 15 5d aa bb cc", "six hex bytes"),
])
def test_parse_mac_refuses(text: str, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        parse_mac(text)


# parse_mtu


@pytest.mark.parametrize(("value", "expected"), [
    (576, 576), (1500, 1500), ("1500", 1500), ("9000", 9000), (65535, 65535),
])
def test_parse_mtu_accepts(value: int | str, expected: int) -> None:
    assert parse_mtu(value) == expected


@pytest.mark.parametrize(("value", "words"), [
    (575, "between 576 and 65535"),
    (65536, "between 576 and 65535"),
    ("99", "between 576 and 65535"),
    (0, "between"),
    ("-1500", "not a number"),
    ("abc", "not a number"),
    ("", "not a number"),
    ("1500.0", "not a number"),
])
def test_parse_mtu_refuses(value: int | str, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        parse_mtu(value)


# NetworkType


@pytest.mark.parametrize("text", ["nat", "NAT", "Nat"])
def test_network_type_parse(text: str) -> None:
    assert NetworkType.parse(text) is NetworkType.NAT


@pytest.mark.parametrize("text", ["mirrored", "Mirrored", "MIRRORED"])
def test_network_type_parse_mirrored(text: str) -> None:
    assert NetworkType.parse(text) is NetworkType.MIRRORED


@pytest.mark.parametrize("text", ["bridge", "", "nat ", "transparent"])
def test_network_type_parse_refuses_with_choices(text: str) -> None:
    with pytest.raises(InvalidRequest, match=r"choose from: nat, mirrored, overlay\)"):
        NetworkType.parse(text)


# JSON shapes


def test_network_to_json_shape() -> None:
    data = make_network().to_json()
    assert data["ID"] == NET_ID
    assert data["Name"] == "WSL"
    assert data["Type"] == "NAT"
    assert data["Subnet"] == "172.16.0.0/20"
    assert data["Gateway"] == "172.16.0.1"
    assert data["Bridge"] == "hbab120b7e3c1a"
    assert data["Mtu"] == 1500
    assert len(data["Ipams"]) == 1
    ipam_ = data["Ipams"][0]
    assert ipam_["Type"] == "Static"
    subnet = ipam_["Subnets"][0]
    assert subnet["IpAddressPrefix"] == "172.16.0.0/20"
    assert subnet["Routes"] == [{"NextHop": "172.16.0.1", "DestinationPrefix": "0.0.0.0/0"}]


def test_vm_to_json_shape() -> None:
    data = make_vm().to_json()
    expected: dict[str, Any] = {
        "ID": VM_ID,
        "Name": "wsl",
        "NetNs": "hns-ab12-wsl",
        "Network": "WSL",
        "IpAddress": "172.16.0.2",
        "PrefixLength": 20,
        "Gateway": "172.16.0.1",
        "MacAddress": "00:15:5d:aa:bb:cc",
        "InterfaceName": "eth0",
    }
    assert {k: data[k] for k in expected} == expected
    assert data["HostComputeNetwork"] == NET_ID
    assert data["Routes"] == [{"NextHop": "172.16.0.1", "DestinationPrefix": "0.0.0.0/0"}]
    assert data["IpConfigurations"] == [{"IpAddress": "172.16.0.2", "PrefixLength": 20}]
    assert data["Policies"] == []


@pytest.mark.parametrize("obj", [make_network(), make_vm()], ids=["network", "vm"])
def test_to_json_is_plain_json(obj: Network | Vm) -> None:
    data = obj.to_json()
    assert json.loads(json.dumps(data)) == data


def test_values_are_frozen() -> None:
    net = make_network()
    with pytest.raises(AttributeError):
        net.name = "other"  # type: ignore[misc]
