"""Mirrored mode, the pure parts: port lists, transit addresses, the host view, the nft
tables and their changes (applied to a fake ruleset)."""

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
from nat.errors import NatError
from nat.fake import FakeNft
from nat.mirror import (
    VM_TABLE,
    InboundPort,
    host_port_elements,
    inbound_elements,
    inbound_table,
    vm_table,
)
from nat.ruleset import Element, Map, Set
from nat.transaction import Transaction

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


HOST_ADDRS: list[IPv4Address | IPv6Address] = [IPv4Address("198.51.100.2"),
                                            IPv6Address("2001:db8:100::2")]
TCP_8080 = InboundPort("tcp", 8080, IPv4Address("169.254.0.2"))
UDP_53 = InboundPort("udp", 53, IPv6Address("fd68:6e73:1::2"), loopback=True)
T4 = ("ipv4_addr", "inet_service")
T6 = ("ipv6_addr", "inet_service")
KEY = ("inet_proto", "inet_service")


def test_inbound_table_maps_ports_per_family() -> None:
    table = inbound_table("hns-1a2b-mirror", HOST_ADDRS, [UDP_53, TCP_8080], owner="hns:ab")
    assert (table.family, table.name, table.comment) == ("inet", "hns-1a2b-mirror", "hns:ab")
    assert table.sets == (Set("addrs4", ("ipv4_addr",), (Element(("198.51.100.2",)),)),
                          Set("addrs6", ("ipv6_addr",), (Element(("2001:db8:100::2",)),)))
    udp = Element(("udp", "53"), ("fd68:6e73:1::2", "53"))
    assert table.maps == (
        Map("in4", KEY, T4, (Element(("tcp", "8080"), ("169.254.0.2", "8080")),)),
        Map("lo4", KEY, T4), Map("in6", KEY, T6, (udp,)), Map("lo6", KEY, T6, (udp,)))
    chains = {c.name: c for c in table.chains}
    assert {n: (c.type, c.hook, c.priority) for n, c in chains.items()} == {
        "prerouting": ("nat", "prerouting", "-90"), "output": ("nat", "output", "-90"),
        "postrouting": ("nat", "postrouting", "srcnat")}
    assert chains["prerouting"].rules == (
        "ip daddr @addrs4 dnat ip to meta l4proto . th dport map @in4",
        "ip6 daddr @addrs6 dnat ip6 to meta l4proto . th dport map @in6")
    assert chains["output"].rules[0] == (
        "ip daddr @addrs4 meta l4proto . th dport @lo4 ct mark set 0x686e7301 "
        "dnat ip to meta l4proto . th dport map @lo4")
    assert chains["postrouting"].rules == ("ct mark 0x686e7301 masquerade",)
    assert 'comment "hns:ab"' in table.render()


def test_inbound_table_refuses_an_unsafe_owner() -> None:
    with pytest.raises(ValueError, match="not a safe comment"):
        inbound_table("hns-1a2b-mirror", HOST_ADDRS, owner='x" drop')


def _inbound_change(fake: FakeNft, gone: list[InboundPort], new: list[InboundPort]) -> None:
    tx = Transaction()
    for name, elements in inbound_elements(gone).items():
        tx.delete_elements("inet", "t", name, elements)
    for name, elements in inbound_elements(new).items():
        tx.add_elements("inet", "t", name, elements)
    fake.run(tx)


def test_inbound_elements_add_and_delete() -> None:
    port = InboundPort("tcp", 80, IPv4Address("169.254.0.2"), loopback=True)
    element = Element(("tcp", "80"), ("169.254.0.2", "80"))
    assert inbound_elements([port]) == {"in4": (element,), "lo4": (element,)}
    fake = FakeNft()
    fake.run(Transaction().replace_table(inbound_table("t", HOST_ADDRS)))
    _inbound_change(fake, [], [port, UDP_53])
    assert fake.transactions[-1].render() == (
        "add element inet t in4 { tcp . 80 : 169.254.0.2 . 80 }\n"
        "add element inet t lo4 { tcp . 80 : 169.254.0.2 . 80 }\n"
        "add element inet t in6 { udp . 53 : fd68:6e73:1::2 . 53 }\n"
        "add element inet t lo6 { udp . 53 : fd68:6e73:1::2 . 53 }\n")
    moved = InboundPort("tcp", 80, IPv4Address("169.254.0.3"))
    _inbound_change(fake, [port], [moved])      # another VM takes the port
    assert fake.transactions[-1].render().startswith(
        "delete element inet t in4 { tcp . 80 }\ndelete element inet t lo4 { tcp . 80 }\n")
    # the same ruleset as the whole table rendered with the ports now forwarded
    assert fake.table("inet", "t") == inbound_table("t", HOST_ADDRS, [moved, UDP_53]).canonical()


def test_inbound_change_of_a_drifted_element_is_refused_whole() -> None:
    fake = FakeNft()
    fake.run(Transaction().replace_table(inbound_table("t", HOST_ADDRS, [TCP_8080])))
    before = fake.dump()
    with pytest.raises(NatError, match="No such file or directory") as excinfo:
        _inbound_change(fake, [UDP_53], [InboundPort("tcp", 22, IPv4Address("169.254.0.2"))])
    assert excinfo.value.is_not_found
    assert fake.dump() == before       # nothing of it applied
    assert len(fake.transactions) == 1


@pytest.mark.parametrize(("protocol", "port"), [("icmp", 1), ("tcp", 0), ("tcp", 70000)])
def test_inbound_port_validates(protocol: str, port: int) -> None:
    with pytest.raises(ValueError):
        InboundPort(protocol, port, IPv4Address("169.254.0.2"))


def test_vm_table_redirects_host_ports_at_the_host_address() -> None:
    table = vm_table("eth0", IPv4Address("169.254.0.2"), IPv6Address("fd68:6e73:1:0::2"),
                     IPv4Address("198.51.100.2"), IPv6Address("2001:db8:100::2"))
    assert table.sets == (Set("host4", KEY), Set("host6", KEY))
    text = table.render()
    assert "set host4 {\n\t\ttype inet_proto . inet_service\n\t}" in text
    assert "ip daddr 198.51.100.2 meta l4proto . th dport @host4 redirect" in text
    assert "ip6 daddr 2001:db8:100::2 meta l4proto . th dport @host6 redirect" in text


def test_host_port_elements() -> None:
    assert host_port_elements([(6, "udp", 53), (4, "tcp", 22), (4, "tcp", 22)]) == {
        "host4": (Element(("tcp", "22")),), "host6": (Element(("udp", "53")),)}
    assert host_port_elements([]) == {}
    with pytest.raises(ValueError):
        host_port_elements([(4, "sctp", 22)])


def test_host_ports_change_the_vm_tables_sets() -> None:
    table = vm_table("eth0", IPv4Address("169.254.0.2"), IPv6Address("fd68:6e73:1:0::2"),
                     IPv4Address("198.51.100.2"), None)
    fake = FakeNft()
    fake.run(Transaction().replace_table(table))
    tx = Transaction()
    for name, elements in host_port_elements([(4, "tcp", 22), (6, "udp", 53)]).items():
        tx.add_elements("inet", VM_TABLE, name, elements)
    fake.run(tx)
    assert tx.render() == ("add element inet hns-mirror host4 { tcp . 22 }\n"
                           "add element inet hns-mirror host6 { udp . 53 }\n")
    now = fake.table("inet", VM_TABLE)
    assert now is not None
    assert now.sets == (Set("host4", KEY, (Element(("tcp", "22")),)),
                        Set("host6", KEY, (Element(("udp", "53")),)))
    assert now.chains == table.chains


def test_nat_table_isolates_mirrored_bridges() -> None:
    from nat.ruleset import NatSpec, nat_table
    mirrored = NatSpec("m1", IPv4Network("169.254.3.0/24"), "hbm",
                       IPv6Network("fd68:6e73:1:3::/64"))
    text = nat_table("hns-1a2b", [mirrored]).render()
    assert 'oifname "hbm" ct status dnat accept comment "mapped:m1"' in text
    assert 'oifname "hbm" drop comment "isolate:m1"' in text
    assert ('ip6 saddr fd68:6e73:1:3::/64 oifname != "hbm" masquerade comment "net6:m1"'
            in text)
