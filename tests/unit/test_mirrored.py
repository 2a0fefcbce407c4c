"""Mirrored mode, the pure parts: port lists, transit addresses, the host view, nft text."""

from __future__ import annotations

from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)

import pytest

from hns.errors import InvalidRequest
from hns.mirrored import (
    HostRoute,
    host_view,
    mirror_spec,
    transit6_address,
    transit6_gateway,
    transit6_subnet,
)
from hns.model import Network, NetworkType, Vm, format_port_list, parse_port_list
from nat.mirror import (
    InboundPort,
    inbound_table,
    render_host_ports,
    render_inbound_elements,
    vm_table,
)

# port lists (--ignored-ports)


@pytest.mark.parametrize(("text", "ports"), [
    ("", ()), ("  ", ()), (None, ()),
    ("22", (22,)),
    ("22,80", (22, 80)),
    ("8000-8002, 22", (22, 8000, 8001, 8002)),
    ("80,80,79-80", (79, 80)),
])
def test_parse_port_list(text: str | None, ports: tuple[int, ...]) -> None:
    assert parse_port_list(text) == ports


@pytest.mark.parametrize("text", ["0", "65536", "a", "22,", ",22", "10-", "-10", "9-8",
                                  "1-5000", "22;80"])
def test_parse_port_list_refuses(text: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid port list"):
        parse_port_list(text)


@pytest.mark.parametrize("ports", [(), (22,), (22, 23, 24, 80, 8000, 8001)])
def test_format_port_list_round_trips(ports: tuple[int, ...]) -> None:
    assert parse_port_list(format_port_list(ports)) == ports


def test_format_port_list_folds_ranges() -> None:
    assert format_port_list((22, 23, 24, 80, 8000, 8001)) == "22-24,80,8000-8001"


def test_mirrored_network_json() -> None:
    net = Network(id="n1", name="M", type=NetworkType.MIRRORED,
                  subnet=IPv4Network("169.254.3.0/24"), gateway=IPv4Address("169.254.3.1"),
                  mtu=1500, bridge="hbxx", ignored_ports=(22, 80), host_address_loopback=True)
    data = net.to_json()
    assert data["Type"] == "Mirrored"
    assert data["IgnoredPorts"] == [22, 80]
    assert data["HostAddressLoopback"] is True
    assert data["LocalhostForwarding"] is False     # loopback is shared instead


def test_nat_network_json_has_no_mirrored_fields() -> None:
    net = Network(id="n1", name="N", type=NetworkType.NAT,
                  subnet=IPv4Network("172.16.0.0/20"), gateway=IPv4Address("172.16.0.1"),
                  mtu=1500, bridge="hbxx")
    assert "IgnoredPorts" not in net.to_json()


# transit addresses


def test_transit6_is_derived_from_instance_and_subnet() -> None:
    subnet = IPv4Network("169.254.7.0/24")
    assert transit6_subnet("1a2b", subnet) == IPv6Network("fd68:6e73:1a2b:7::/64")
    assert transit6_gateway("1a2b", subnet) == IPv6Address("fd68:6e73:1a2b:7::1")
    assert transit6_address("1a2b", subnet, IPv4Address("169.254.7.9")) == \
        IPv6Address("fd68:6e73:1a2b:7::9")


def test_mirror_spec_of_a_vm() -> None:
    vm = Vm(id="v", name="box", network="M", network_id="n", netns="hns-1a2b-box",
            ip=IPv4Address("169.254.7.2"), prefixlen=24, gateway=IPv4Address("169.254.7.1"),
            mac="00:15:5d:00:00:01", host_ifname="hv1a2b00000000", mtu=1500)
    view = host_view([("up0", IPv4Interface("198.51.100.2/24"))],
                     [(IPv4Network("0.0.0.0/0"), 0)], ["up0"])
    spec = mirror_spec(vm, "1a2b", view)
    assert spec.transit4 == IPv4Interface("169.254.7.2/24")
    assert spec.transit6 == IPv6Interface("fd68:6e73:1a2b:7::2/64")
    assert spec.addresses()[2:] == (IPv4Interface("198.51.100.2/24"),)
    assert spec.routes() == [(IPv4Network("0.0.0.0/0"), IPv4Address("169.254.7.1"),
                              IPv4Address("198.51.100.2"), 0)]


# the host view


def test_host_view_keeps_global_addresses_and_routes() -> None:
    view = host_view(
        addresses=[("up0", IPv4Interface("198.51.100.2/24")),
                   ("wlan", IPv4Interface("10.9.0.5/16")),
                   ("up0", IPv6Interface("2001:db8:100::2/64")),
                   ("up0", IPv6Interface("fe80::1/64")),
                   ("hb", IPv4Interface("169.254.0.1/24"))],
        routes=[(IPv4Network("0.0.0.0/0"), 100),
                (IPv4Network("198.51.100.0/24"), 0),
                (IPv4Network("169.254.0.0/24"), 0),
                (IPv6Network("fe80::/64"), 256),
                (IPv6Network("ff00::/8"), 256),
                (IPv6Network("::/0"), 1024)],
        default_devs=["up0"])
    assert view.addresses == (IPv4Interface("10.9.0.5/16"), IPv4Interface("198.51.100.2/24"),
                              IPv6Interface("2001:db8:100::2/64"))
    assert view.primary4 == IPv4Address("198.51.100.2")     # on the default route's device
    assert view.primary6 == IPv6Address("2001:db8:100::2")
    assert view.routes == (HostRoute(IPv4Network("0.0.0.0/0"), 100),
                           HostRoute(IPv4Network("198.51.100.0/24"), 0),
                           HostRoute(IPv6Network("::/0"), 1024))


def test_host_view_primary_without_default_route_is_the_first() -> None:
    view = host_view([("b", IPv4Interface("10.0.0.9/8")), ("a", IPv4Interface("10.0.0.3/8"))],
                     [])
    assert view.primary4 == IPv4Address("10.0.0.9")
    assert view.primary6 is None


# nft text


def test_vm_table_translates_between_transit_and_mirrored() -> None:
    text = vm_table("eth0", IPv4Address("169.254.0.2"), IPv6Address("fd68:6e73:1:0::2"),
                    IPv4Address("198.51.100.2"), None).render()
    assert 'iifname "eth0" ip daddr 169.254.0.2 dnat ip to 198.51.100.2' in text
    assert 'oifname "eth0" ip saddr != 169.254.0.2 snat ip to 169.254.0.2' in text
    assert "dnat ip6" not in text          # no IPv6 address to mirror
    assert "snat ip6 to fd68:6e73:1::2" in text


def test_vm_table_refuses_a_bad_interface_name() -> None:
    with pytest.raises(ValueError, match="interface"):
        vm_table('eth0"; flush ruleset', IPv4Address("169.254.0.2"),
                 IPv6Address("fd00::2"), None, None)


def test_inbound_table_maps_ports_per_family() -> None:
    ports = [InboundPort("tcp", 8080, IPv4Address("169.254.0.2")),
             InboundPort("udp", 53, IPv6Address("fd68:6e73:1::2"), loopback=True)]
    text = inbound_table("hns-1a2b-mirror",
                         [IPv4Address("198.51.100.2"), IPv6Address("2001:db8:100::2")], ports)
    assert text.startswith("table inet hns-1a2b-mirror {}\ndelete table inet hns-1a2b-mirror\n")
    assert "set addrs4 { type ipv4_addr; elements = { 198.51.100.2 }; }" in text
    assert "map in4 { type inet_proto . inet_service : ipv4_addr . inet_service; " \
           "elements = { tcp . 8080 : 169.254.0.2 . 8080 }; }" in text
    assert "map lo4 { type inet_proto . inet_service : ipv4_addr . inet_service; }" in text
    assert "elements = { udp . 53 : fd68:6e73:1::2 . 53 }" in text
    assert text.count("udp . 53 : fd68:6e73:1::2 . 53") == 2     # in6 and lo6


def test_inbound_elements_add_and_delete() -> None:
    port = InboundPort("tcp", 80, IPv4Address("169.254.0.2"), loopback=True)
    assert render_inbound_elements("add", "t", [port]) == (
        "add element inet t in4 { tcp . 80 : 169.254.0.2 . 80 }\n"
        "add element inet t lo4 { tcp . 80 : 169.254.0.2 . 80 }\n")
    assert render_inbound_elements("delete", "t", [port]) == (
        "delete element inet t in4 { tcp . 80 }\ndelete element inet t lo4 { tcp . 80 }\n")


@pytest.mark.parametrize(("protocol", "port"), [("icmp", 1), ("tcp", 0), ("tcp", 70000)])
def test_inbound_port_validates(protocol: str, port: int) -> None:
    with pytest.raises(ValueError):
        InboundPort(protocol, port, IPv4Address("169.254.0.2"))


def test_vm_table_redirects_host_ports_at_the_host_address() -> None:
    text = vm_table("eth0", IPv4Address("169.254.0.2"), IPv6Address("fd68:6e73:1:0::2"),
                    IPv4Address("198.51.100.2"), IPv6Address("2001:db8:100::2")).render()
    assert "set host4 {\n\t\ttype inet_proto . inet_service\n\t}" in text
    assert "ip daddr 198.51.100.2 meta l4proto . th dport @host4 redirect" in text
    assert "ip6 daddr 2001:db8:100::2 meta l4proto . th dport @host6 redirect" in text


def test_render_host_ports() -> None:
    assert render_host_ports("add", [(4, "tcp", 22), (6, "udp", 53)]) == (
        "add element inet hns-mirror host4 { tcp . 22 }\n"
        "add element inet hns-mirror host6 { udp . 53 }\n")
    assert render_host_ports("delete", []) == ""
    with pytest.raises(ValueError):
        render_host_ports("add", [(4, "sctp", 22)])


def test_nat_table_isolates_mirrored_bridges() -> None:
    from nat.ruleset import NatSpec, nat_table
    mirrored = NatSpec("m1", IPv4Network("169.254.3.0/24"), "hbm",
                       IPv6Network("fd68:6e73:1:3::/64"))
    text = nat_table("hns-1a2b", [mirrored]).render()
    assert 'oifname "hbm" ct status dnat accept comment "mapped:m1"' in text
    assert 'oifname "hbm" drop comment "isolate:m1"' in text
    assert ('ip6 saddr fd68:6e73:1:3::/64 oifname != "hbm" masquerade comment "net6:m1"'
            in text)
