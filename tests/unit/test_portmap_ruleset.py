"""nat.ruleset, port mappings: maps with concatenated keys, the DNAT and hairpin rules,
incremental element transactions, and that only typed values reach the text."""

from __future__ import annotations

import os
import shutil
import subprocess
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from nat.fake import FakeNft
from nat.ruleset import (
    Element,
    Map,
    NatSpec,
    PortMapSpec,
    hairpin_rule,
    nat_table,
    port_map_elements,
    port_maps,
)
from nat.transaction import Transaction

NET_ID = "a1b2c3d4-0000-4000-8000-000000000001"
VM_A = IPv4Address("172.16.0.2")
VM_B = IPv4Address("172.16.0.3")
HOST = IPv4Address("198.51.100.2")


def net() -> NatSpec:
    return NatSpec(NET_ID, IPv4Network("172.16.0.0/20"), "hbab12a1b2c3d4")


def three() -> list[PortMapSpec]:
    return [PortMapSpec(17, 53, VM_A, 5353),
            PortMapSpec(6, 443, VM_B, 8443, HOST),
            PortMapSpec(6, 8080, VM_A, 80)]


GOLDEN_MAPS = """\
\tset pm_count {
\t\ttype ipv4_addr . inet_proto . inet_service
\t\tcounter
\t\telements = {
\t\t\t172.16.0.2 . tcp . 80,
\t\t\t172.16.0.2 . udp . 5353,
\t\t\t172.16.0.3 . tcp . 8443
\t\t}
\t}
\tmap pm_any {
\t\ttype inet_proto . inet_service : ipv4_addr . inet_service
\t\telements = {
\t\t\ttcp . 8080 : 172.16.0.2 . 80,
\t\t\tudp . 53 : 172.16.0.2 . 5353
\t\t}
\t}
\tmap pm_addr {
\t\ttype ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service
\t\telements = {
\t\t\t198.51.100.2 . tcp . 443 : 172.16.0.3 . 8443
\t\t}
\t}
"""


def test_maps_golden_and_sorted() -> None:
    text = nat_table("hns-ab12", [net()], three()).render()
    assert text.startswith("table inet hns-ab12 {\n" + GOLDEN_MAPS)
    assert text == nat_table("hns-ab12", [net()], reversed(three())).render()


def test_dnat_rules_look_up_the_maps_in_prerouting_and_output() -> None:
    table = nat_table("hns-ab12", [net()], three())
    chains = {c.name: c for c in table.chains}
    for name, hook, priority in (("prerouting", "prerouting", "dstnat"),
                                 ("output", "output", "-100")):
        chain = chains[name]
        assert (chain.type, chain.hook, chain.priority) == ("nat", hook, priority)
        assert chain.rules == (
            "ip daddr != 127.0.0.0/8 fib daddr type local "
            "dnat ip to ip daddr . meta l4proto . th dport map @pm_addr",
            "ip daddr != 127.0.0.0/8 fib daddr type local "
            "dnat ip to meta l4proto . th dport map @pm_any")


def test_rules_do_not_grow_with_mappings() -> None:
    many = [PortMapSpec(6, port, VM_A, 80) for port in range(1000, 3000)]
    small = nat_table("hns-ab12", [net()], many[:1])
    big = nat_table("hns-ab12", [net()], many)
    assert [c.rules for c in small.chains] == [c.rules for c in big.chains]
    assert len(big.maps[0].elements) == 2000


def test_hairpin_masquerade_per_network() -> None:
    postrouting = nat_table("hns-ab12", [net()]).chains[0]
    assert postrouting.rules[-1] == (
        "ct status dnat ip saddr 172.16.0.0/20 ip daddr 172.16.0.0/20 masquerade "
        f'comment "hairpin:{NET_ID}"')
    assert hairpin_rule(IPv4Network("10.0.0.0/24"), "x") == (
        'ct status dnat ip saddr 10.0.0.0/24 ip daddr 10.0.0.0/24 masquerade comment "x"')


def add(table: str, mappings: list[PortMapSpec]) -> Transaction:
    tx = Transaction()
    for name, elements in port_map_elements(mappings).items():
        tx.add_elements("inet", table, name, elements)
    return tx


def delete(table: str, mappings: list[PortMapSpec]) -> Transaction:
    tx = Transaction()
    for name, elements in port_map_elements(mappings).items():
        tx.delete_elements("inet", table, name, elements)
    return tx


def test_elements_by_map_in_the_given_order() -> None:
    assert port_map_elements(three()) == {
        "pm_any": (Element(("udp", "53"), ("172.16.0.2", "5353")),
                   Element(("tcp", "8080"), ("172.16.0.2", "80"))),
        "pm_addr": (Element(("198.51.100.2", "tcp", "443"), ("172.16.0.3", "8443")),)}
    assert port_map_elements([]) == {}


def test_add_is_one_command_per_map() -> None:
    assert add("hns-ab12", three()).render() == (
        "add element inet hns-ab12 pm_any { udp . 53 : 172.16.0.2 . 5353, "
        "tcp . 8080 : 172.16.0.2 . 80 }\n"
        "add element inet hns-ab12 pm_addr { 198.51.100.2 . tcp . 443 : 172.16.0.3 . 8443 }\n")


def test_delete_names_keys_only() -> None:
    assert delete("hns-ab12", three()).render() == (
        "delete element inet hns-ab12 pm_any { udp . 53, tcp . 8080 }\n"
        "delete element inet hns-ab12 pm_addr { 198.51.100.2 . tcp . 443 }\n")


def test_nothing_to_change_is_an_empty_transaction() -> None:
    assert not add("hns-ab12", []) and not delete("hns-ab12", [])
    assert add("hns-ab12", []).render() == ""


def test_elements_change_the_table_as_a_whole_render_would() -> None:
    extra = [PortMapSpec(6, 9000, VM_B, 9000), PortMapSpec(17, 9000, VM_B, 9000, HOST)]
    fake = FakeNft()
    fake.run(Transaction().replace_table(nat_table("hns-ab12", [net()], three())))
    fake.run(add("hns-ab12", extra))
    fake.run(delete("hns-ab12", three()[:2]))
    got = fake.table("inet", "hns-ab12")
    want = nat_table("hns-ab12", [net()], [*extra, three()[2]]).canonical()
    assert got is not None
    assert (got.chains, got.maps) == (want.chains, want.maps)


def test_port_maps_without_mappings_are_empty_declarations() -> None:
    any_, addr = port_maps([])
    assert any_.render() == ("\tmap pm_any {\n"
                             "\t\ttype inet_proto . inet_service : ipv4_addr . inet_service\n\t}")
    assert addr.elements == ()


# only typed, validated values


@pytest.mark.parametrize("kwargs", [
    {"protocol": 1}, {"protocol": 132}, {"protocol": "tcp"}, {"protocol": True},
    {"external_port": 0}, {"external_port": 65536}, {"external_port": "80"},
    {"external_port": True}, {"external_port": 80.0}, {"internal_port": -1},
    {"internal_port": "80 }"}, {"target": "172.16.0.2"}, {"target": "1.2.3.4 . 1 }"},
    {"target": IPv4Network("172.16.0.0/24")}, {"host_address": "198.51.100.2"},
    {"host_address": 0},
])
def test_spec_refuses_anything_but_typed_values(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"protocol": 6, "external_port": 80, "target": VM_A,
                            "internal_port": 80, **kwargs}
    with pytest.raises(ValueError):
        PortMapSpec(**args)


@pytest.mark.parametrize("name", ['t"', "t; flush ruleset", "t }", ""])
def test_element_changes_refuse_unsafe_table_names(name: str) -> None:
    with pytest.raises(ValueError):
        add(name, three())
    with pytest.raises(ValueError):
        delete(name, three())


@pytest.mark.parametrize("word", ["ipv4_addr;", "string", "ipv4_addr }", ""])
def test_map_refuses_unknown_data_types(word: str) -> None:
    with pytest.raises(ValueError, match="bad map data type"):
        Map("m", (word,), ("inet_service",))


def test_map_refuses_unsafe_names() -> None:
    with pytest.raises(ValueError, match="not an nft identifier"):
        Map("m }", ("inet_service",), ("inet_service",))


# the text is what nft accepts (checked in a throwaway network namespace)


def _nft_check(script: str) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("unshare"):
        pytest.skip("needs root, nft and unshare")
    return subprocess.run(["unshare", "--net", "nft", "-c", "-f", "-"], input=script,
                          capture_output=True, text=True, timeout=30, check=False)


def test_nft_accepts_the_full_table_and_element_scripts() -> None:
    table = nat_table("hns-ab12", [net()], three())
    extra = [PortMapSpec(6, 9000, VM_B, 9000), PortMapSpec(17, 9000, VM_B, 9000, HOST)]
    script = (Transaction().replace_table(table).render() + add("hns-ab12", extra).render()
              + delete("hns-ab12", three()).render())
    result = _nft_check(script)
    assert result.returncode == 0, result.stderr
