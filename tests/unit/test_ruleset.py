"""nat.ruleset: the nft text of the NAT table, and that no input can inject nft syntax."""

from __future__ import annotations

import uuid
from ipaddress import IPv4Network

import pytest

from hns import naming
from nat.fake import FakeNft
from nat.ruleset import (
    Chain,
    NatSpec,
    Table,
    isolation_rules,
    masquerade_rule,
    nat_table,
)
from nat.transaction import Transaction

ID_A = "a1b2c3d4-0000-4000-8000-000000000001"
ID_B = "b2c3d4e5-0000-4000-8000-000000000002"

GOLDEN_TABLE = """\
table inet hns-ab12 {
\tset pm_count {
\t\ttype ipv4_addr . inet_proto . inet_service
\t\tcounter
\t}
\tmap pm_any {
\t\ttype inet_proto . inet_service : ipv4_addr . inet_service
\t}
\tmap pm_addr {
\t\ttype ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr 172.16.0.0/20 oifname != "hbab12a1b2c3d4" masquerade comment "net:a1b2c3d4-0000-4000-8000-000000000001"
\t\tip saddr 192.168.0.0/20 oifname != "hbab12b2c3d4e5" masquerade comment "net:b2c3d4e5-0000-4000-8000-000000000002"
\t\tct status dnat ip saddr 172.16.0.0/20 ip daddr 172.16.0.0/20 masquerade comment "hairpin:a1b2c3d4-0000-4000-8000-000000000001"
\t\tct status dnat ip saddr 192.168.0.0/20 ip daddr 192.168.0.0/20 masquerade comment "hairpin:b2c3d4e5-0000-4000-8000-000000000002"
\t}
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tip daddr != 127.0.0.0/8 fib daddr type local dnat ip to ip daddr . meta l4proto . th dport map @pm_addr
\t\tip daddr != 127.0.0.0/8 fib daddr type local dnat ip to meta l4proto . th dport map @pm_any
\t}
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tip daddr != 127.0.0.0/8 fib daddr type local dnat ip to ip daddr . meta l4proto . th dport map @pm_addr
\t\tip daddr != 127.0.0.0/8 fib daddr type local dnat ip to meta l4proto . th dport map @pm_any
\t}
\tchain forward {
\t\ttype filter hook forward priority filter - 10; policy accept;
\t\tct state established,related accept
\t\toifname "hbab12a1b2c3d4" iifname "hbab12a1b2c3d4" accept comment "same:a1b2c3d4-0000-4000-8000-000000000001"
\t\toifname "hbab12a1b2c3d4" ct status dnat accept comment "mapped:a1b2c3d4-0000-4000-8000-000000000001"
\t\toifname "hbab12a1b2c3d4" drop comment "isolate:a1b2c3d4-0000-4000-8000-000000000001"
\t\toifname "hbab12b2c3d4e5" iifname "hbab12b2c3d4e5" accept comment "same:b2c3d4e5-0000-4000-8000-000000000002"
\t\toifname "hbab12b2c3d4e5" ct status dnat accept comment "mapped:b2c3d4e5-0000-4000-8000-000000000002"
\t\toifname "hbab12b2c3d4e5" drop comment "isolate:b2c3d4e5-0000-4000-8000-000000000002"
\t}
\tchain count_forward {
\t\ttype filter hook forward priority filter - 20; policy accept;
\t\tct status dnat ct direction original ip daddr . meta l4proto . th dport @pm_count
\t\tct status dnat ct direction reply ip saddr . meta l4proto . th sport @pm_count
\t}
\tchain count_input {
\t\ttype filter hook input priority filter - 20; policy accept;
\t\tct status dnat ct direction original ip daddr . meta l4proto . th dport @pm_count
\t\tct status dnat ct direction reply ip saddr . meta l4proto . th sport @pm_count
\t}
\tchain count_output {
\t\ttype filter hook output priority filter - 20; policy accept;
\t\tct status dnat ct direction original ip daddr . meta l4proto . th dport @pm_count
\t\tct status dnat ct direction reply ip saddr . meta l4proto . th sport @pm_count
\t}
}
"""  # noqa: E501

BAD_NAMES = ['a"b', "a'b", "a b", "a;b", "a{b", "a}b", "a\nb", "a\n", "\na", "a\tb", "a#b",
             "a\\b", "a$b", "", "flush ruleset", "x; flush ruleset", "x }\ntable ip y {"]


def two_networks() -> list[NatSpec]:
    # given out of order: the table sorts by id
    return [NatSpec(ID_B, IPv4Network("192.168.0.0/20"), "hbab12b2c3d4e5"),
            NatSpec(ID_A, IPv4Network("172.16.0.0/20"), "hbab12a1b2c3d4")]


def test_nat_table_golden() -> None:
    assert nat_table("hns-ab12", two_networks()).render() == GOLDEN_TABLE


def test_nat_table_order_does_not_depend_on_input_order() -> None:
    specs = two_networks()
    assert (nat_table("hns-ab12", specs).render()
            == nat_table("hns-ab12", reversed(specs)).render())


def test_nat_table_structure() -> None:
    table = nat_table("hns-ab12", two_networks())
    assert (table.family, table.name) == ("inet", "hns-ab12")
    chain = table.chains[0]
    assert (chain.name, chain.type, chain.hook, chain.priority, chain.policy) == (
        "postrouting", "nat", "postrouting", "srcnat", "accept")
    assert len(chain.rules) == 4  # masquerade and hairpin per network
    assert [(c.name, c.hook) for c in table.chains[1:]] == [
        ("prerouting", "prerouting"), ("output", "output"), ("forward", "forward"),
        ("count_forward", "forward"), ("count_input", "input"), ("count_output", "output")]
    assert [m.name for m in table.maps] == ["pm_any", "pm_addr"]
    assert [(s.name, s.counter) for s in table.sets] == [("pm_count", True)]


def test_nat_table_without_networks_has_an_empty_chain() -> None:
    table = nat_table("hns-ab12", [])
    assert table.chains[0].rules == ()
    assert "masquerade" not in table.render()


def test_destroy_table_shape() -> None:
    assert Transaction().destroy_table("inet", "hns-ab12").render() == (
        "add table inet hns-ab12\n"
        "delete table inet hns-ab12\n")


def test_replace_table_is_destroy_then_definition() -> None:
    table = nat_table("hns-ab12", two_networks())
    destroy = Transaction().destroy_table("inet", "hns-ab12").render()
    assert Transaction().replace_table(table).render().startswith(destroy)
    fake = FakeNft()
    fake.run(Transaction().replace_table(table))
    assert fake.table("inet", "hns-ab12") == table.canonical()


def test_masquerade_rule_text() -> None:
    assert masquerade_rule(IPv4Network("10.50.0.0/24"), "br0", "net:x") == (
        'ip saddr 10.50.0.0/24 oifname != "br0" masquerade comment "net:x"')


def test_chain_render_regular_chain() -> None:
    assert Chain("fwd", ("counter", "accept")).render() == (
        "\tchain fwd {\n\t\tcounter\n\t\taccept\n\t}")


def test_chain_render_base_chain_with_drop_policy() -> None:
    chain = Chain("in", type="filter", hook="input", priority="filter - 5", policy="drop")
    assert chain.render().splitlines()[1] == (
        "\t\ttype filter hook input priority filter - 5; policy drop;")


def test_names_made_by_hns_are_accepted() -> None:
    instance = "0f9e"
    net_id = str(uuid.uuid4())
    table = nat_table(naming.nft_table_name(instance),
                      [NatSpec(net_id, IPv4Network("10.1.0.0/16"),
                               naming.bridge_name(instance, net_id))])
    assert f'comment "net:{net_id}"' in table.render()


# injection


@pytest.mark.parametrize("name", BAD_NAMES)
def test_table_refuses_unsafe_names(name: str) -> None:
    with pytest.raises(ValueError, match="not an nft identifier"):
        Table("inet", name)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_chain_refuses_unsafe_names(name: str) -> None:
    with pytest.raises(ValueError, match="not an nft identifier"):
        Chain(name)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_destroy_table_refuses_unsafe_names(name: str) -> None:
    with pytest.raises(ValueError):
        Transaction().destroy_table("inet", name)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_nat_table_refuses_unsafe_table_names(name: str) -> None:
    with pytest.raises(ValueError):
        nat_table(name, two_networks())


@pytest.mark.parametrize("name", [*BAD_NAMES, "sixteen-chars-xx", "a/b"])
def test_masquerade_rule_refuses_unsafe_bridge_names(name: str) -> None:
    with pytest.raises(ValueError, match="not an interface name"):
        masquerade_rule(IPv4Network("10.50.0.0/24"), name, "net:x")


@pytest.mark.parametrize("comment", [*BAD_NAMES, "x" * 129])
def test_masquerade_rule_refuses_unsafe_comments(comment: str) -> None:
    with pytest.raises(ValueError, match="not a safe comment"):
        masquerade_rule(IPv4Network("10.50.0.0/24"), "br0", comment)


@pytest.mark.parametrize("subnet", ['10.0.0.0/8" accept', "10.0.0.0/8; flush ruleset",
                                    "10.0.0.1/8", "fd00::/64"])
def test_masquerade_rule_refuses_anything_but_an_ipv4_network(subnet: str) -> None:
    with pytest.raises(ValueError):
        masquerade_rule(subnet, "br0", "net:x")  # type: ignore[arg-type]


@pytest.mark.parametrize("net_id", ['x" drop', "x;y", "x y", "x\n"])
def test_nat_table_refuses_unsafe_network_ids(net_id: str) -> None:
    with pytest.raises(ValueError):
        nat_table("hns-ab12", [NatSpec(net_id, IPv4Network("10.50.0.0/24"), "br0")])


@pytest.mark.parametrize("family", ["inet;", "inet ", "INET", "foo", ""])
def test_table_refuses_unknown_families(family: str) -> None:
    with pytest.raises(ValueError, match="bad table family"):
        Table(family, "t")


@pytest.mark.parametrize("field", ["type", "hook", "priority"])
@pytest.mark.parametrize("value", ["nat;", "nat }", "nat\n", 'nat"', "nat{", "Nat"])
def test_chain_refuses_unsafe_attributes(field: str, value: str) -> None:
    attrs = {"type": "nat", "hook": "postrouting", "priority": "srcnat", field: value}
    with pytest.raises(ValueError, match="bad chain attribute"):
        Chain("c", type=attrs["type"], hook=attrs["hook"], priority=attrs["priority"])


@pytest.mark.parametrize("policy", ["reject", "accept;", "drop\n", ""])
def test_chain_refuses_unknown_policies(policy: str) -> None:
    with pytest.raises(ValueError, match="bad chain policy"):
        Chain("c", policy=policy)


@pytest.mark.parametrize(("type_", "hook", "priority"), [
    ("nat", None, None),
    ("nat", "postrouting", None),
    (None, "postrouting", "srcnat"),
])
def test_chain_refuses_incomplete_base_chain(type_: str | None, hook: str | None,
                                             priority: str | None) -> None:
    with pytest.raises(ValueError, match="type, hook and priority together"):
        Chain("c", type=type_, hook=hook, priority=priority)


def _forward_rules(text: str) -> list[str]:
    body = text.split("chain forward {", 1)[1].split("}", 1)[0]
    return [line.strip() for line in body.splitlines() if line.strip()]


def test_isolation_chain_lets_in_replies_translated_and_own_traffic_only() -> None:
    a = NatSpec("a1", IPv4Network("172.16.0.0/20"), "hba")
    b = NatSpec("b1", IPv4Network("172.16.16.0/20"), "hbb")
    rules = _forward_rules(nat_table("hns-1a2b", [b, a]).render())
    assert rules == [
        "type filter hook forward priority filter - 10; policy accept;",
        "ct state established,related accept",
        'oifname "hba" iifname "hba" accept comment "same:a1"',
        'oifname "hba" ct status dnat accept comment "mapped:a1"',
        'oifname "hba" drop comment "isolate:a1"',
        'oifname "hbb" iifname "hbb" accept comment "same:b1"',
        'oifname "hbb" ct status dnat accept comment "mapped:b1"',
        'oifname "hbb" drop comment "isolate:b1"',
    ]


def test_isolation_off_leaves_a_network_out_of_the_forward_chain() -> None:
    a = NatSpec("a1", IPv4Network("172.16.0.0/20"), "hba", isolated=False)
    b = NatSpec("b1", IPv4Network("172.16.16.0/20"), "hbb")
    text = nat_table("hns-1a2b", [a, b]).render()
    assert '"hba"' not in text.split("chain forward {", 1)[1]
    assert "chain forward {" not in nat_table("hns-1a2b", [a]).render()


def test_isolation_rules_refuse_bad_names() -> None:
    with pytest.raises(ValueError):
        isolation_rules('hb"; flush ruleset', "a1")
    with pytest.raises(ValueError):
        isolation_rules("hba", "a1 }")
