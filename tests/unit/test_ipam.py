"""hns.ipam: subnets, addresses and MACs chosen from what is taken.  Pure, no root."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest

from hns import ipam
from hns.errors import AlreadyExists, Conflict, InvalidRequest
from hns.model import parse_mac

MAC_PATTERN = re.compile(r"00:15:5d(:[0-9a-f]{2}){3}")


def nets(*texts: str) -> list[IPv4Network]:
    return [IPv4Network(t) for t in texts]


def addr(text: str) -> IPv4Address:
    return IPv4Address(text)


# choose_subnet


def test_choose_subnet_nothing_taken_gives_first_slash20_of_172_16() -> None:
    choice = ipam.choose_subnet([])
    assert choice == ipam.SubnetChoice(IPv4Network("172.16.0.0/20"), replaced=None)


@pytest.mark.parametrize(("taken", "expected"), [
    (["172.16.0.0/20"], "172.16.16.0/20"),
    (["172.16.0.0/20", "172.16.16.0/20", "172.16.32.0/20"], "172.16.48.0/20"),
    (["172.16.5.0/24"], "172.16.16.0/20"),            # partial overlap counts as taken
    (["172.16.0.0/20", "172.16.32.0/20"], "172.16.16.0/20"),  # a hole is reused
    (["172.16.0.0/16"], "172.17.0.0/20"),
    (["10.0.0.0/8", "192.168.0.0/16"], "172.16.0.0/20"),  # unrelated prefixes ignored
])
def test_choose_subnet_first_free_slash20_skipping_taken(taken: list[str],
                                                         expected: str) -> None:
    assert ipam.choose_subnet(nets(*taken)).subnet == IPv4Network(expected)


@pytest.mark.parametrize(("taken", "expected"), [
    (["172.16.0.0/12"], "192.168.0.0/20"),
    (["172.16.0.0/12", "192.168.0.0/20"], "192.168.16.0/20"),
    (["172.16.0.0/12", "192.168.0.0/17"], "192.168.128.0/20"),
])
def test_choose_subnet_falls_back_to_192_168(taken: list[str], expected: str) -> None:
    assert ipam.choose_subnet(nets(*taken)).subnet == IPv4Network(expected)


def test_choose_subnet_exhausted_raises_conflict_naming_the_pools() -> None:
    with pytest.raises(Conflict) as excinfo:
        ipam.choose_subnet(nets("172.16.0.0/12", "192.168.0.0/16"))
    message = str(excinfo.value)
    assert "172.16.0.0/12" in message
    assert "192.168.0.0/16" in message
    assert "--subnet" in message


def test_choose_subnet_exhausted_pool_by_pool_raises_conflict() -> None:
    taken = [*IPv4Network("172.16.0.0/12").subnets(new_prefix=20),
             *IPv4Network("192.168.0.0/16").subnets(new_prefix=20)]
    with pytest.raises(Conflict):
        ipam.choose_subnet(taken)


def test_choose_subnet_remembered_and_free_is_reused() -> None:
    remembered = IPv4Network("172.16.48.0/20")
    choice = ipam.choose_subnet(nets("172.16.0.0/20"), remembered)
    assert choice.subnet == remembered
    assert choice.replaced is None


def test_choose_subnet_remembered_outside_the_pools_is_reused() -> None:
    remembered = IPv4Network("10.77.0.0/16")
    assert ipam.choose_subnet([], remembered) == ipam.SubnetChoice(remembered)


def test_choose_subnet_remembered_colliding_gives_new_one_with_replaced_set() -> None:
    remembered = IPv4Network("172.16.0.0/20")
    choice = ipam.choose_subnet(nets("172.16.8.0/24"), remembered)
    assert choice.subnet == IPv4Network("172.16.16.0/20")
    assert choice.replaced == remembered
    assert not choice.subnet.overlaps(IPv4Network("172.16.8.0/24"))


def test_choose_subnet_remembered_colliding_and_pools_exhausted_raises_conflict() -> None:
    with pytest.raises(Conflict):
        ipam.choose_subnet(nets("172.16.0.0/12", "192.168.0.0/16"),
                           IPv4Network("172.20.0.0/20"))


def test_choose_subnet_accepts_a_one_shot_iterable() -> None:
    def taken() -> Iterator[IPv4Network]:
        yield IPv4Network("172.16.0.0/20")

    choice = ipam.choose_subnet(taken(), IPv4Network("172.16.0.0/20"))
    assert choice.subnet == IPv4Network("172.16.16.0/20")


def test_choose_subnet_other_prefixlen_and_pools() -> None:
    pools = nets("10.200.0.0/16")
    assert ipam.choose_subnet(nets("10.200.0.0/24"), pools=pools,
                              prefixlen=24).subnet == IPv4Network("10.200.1.0/24")


def test_choose_subnet_skips_pools_smaller_than_the_prefix() -> None:
    pools = nets("10.9.0.0/24", "10.10.0.0/16")
    assert ipam.choose_subnet([], pools=pools).subnet == IPv4Network("10.10.0.0/20")
    with pytest.raises(Conflict):
        ipam.choose_subnet([], pools=nets("10.9.0.0/24"))


# check_subnet_free, default_gateway, validate_gateway


def test_check_subnet_free_accepts_disjoint() -> None:
    ipam.check_subnet_free(IPv4Network("10.50.0.0/24"),
                           [("network a", IPv4Network("10.51.0.0/24")),
                            ("route x", IPv4Network("172.16.0.0/12"))])


@pytest.mark.parametrize("other", ["10.50.0.0/24", "10.50.0.128/25", "10.0.0.0/8"])
def test_check_subnet_free_refuses_overlap_and_says_what(other: str) -> None:
    with pytest.raises(Conflict) as excinfo:
        ipam.check_subnet_free(IPv4Network("10.50.0.0/24"),
                               [("network a", IPv4Network("192.168.0.0/24")),
                                ("address 10.50.0.9/24 on eth0", IPv4Network(other))])
    assert str(excinfo.value) == (f"subnet 10.50.0.0/24 overlaps {other} "
                                  "(address 10.50.0.9/24 on eth0)")


@pytest.mark.parametrize(("subnet", "gateway"), [
    ("172.16.0.0/20", "172.16.0.1"),
    ("10.50.0.0/24", "10.50.0.1"),
    ("192.168.7.8/30", "192.168.7.9"),
])
def test_default_gateway_is_first_host(subnet: str, gateway: str) -> None:
    assert ipam.default_gateway(IPv4Network(subnet)) == addr(gateway)


@pytest.mark.parametrize("gateway", ["10.50.0.1", "10.50.0.100", "10.50.0.254"])
def test_validate_gateway_accepts_a_host_address(gateway: str) -> None:
    assert ipam.validate_gateway(IPv4Network("10.50.0.0/24"), addr(gateway)) == addr(gateway)


@pytest.mark.parametrize(("gateway", "words"), [
    ("10.51.0.1", "outside"),
    ("10.50.0.0", "network or broadcast"),
    ("10.50.0.255", "network or broadcast"),
])
def test_validate_gateway_refuses(gateway: str, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        ipam.validate_gateway(IPv4Network("10.50.0.0/24"), addr(gateway))


# allocate_ip

SUBNET = IPv4Network("10.50.0.0/24")
GATEWAY = addr("10.50.0.1")


@pytest.mark.parametrize(("taken", "expected"), [
    ([], "10.50.0.2"),
    (["10.50.0.2", "10.50.0.3"], "10.50.0.4"),
    (["10.50.0.3"], "10.50.0.2"),
    (["10.50.0.2", "10.50.0.4"], "10.50.0.3"),
    (["10.99.0.2", "10.50.0.2"], "10.50.0.3"),   # foreign addresses are irrelevant
])
def test_allocate_ip_lowest_free(taken: list[str], expected: str) -> None:
    assert ipam.allocate_ip(SUBNET, GATEWAY, [addr(t) for t in taken]) == addr(expected)


def test_allocate_ip_skips_a_gateway_that_is_not_first() -> None:
    gateway = addr("10.50.0.2")
    assert ipam.allocate_ip(SUBNET, gateway, []) == addr("10.50.0.1")
    assert ipam.allocate_ip(SUBNET, gateway, [addr("10.50.0.1")]) == addr("10.50.0.3")


@pytest.mark.parametrize("subnet", ["10.50.0.0/30", "10.50.0.0/29", "10.50.0.64/28"])
def test_allocate_ip_fills_the_subnet_then_conflicts(subnet: str) -> None:
    net = IPv4Network(subnet)
    gateway = ipam.default_gateway(net)
    taken: list[IPv4Address] = []
    while True:
        try:
            taken.append(ipam.allocate_ip(net, gateway, taken))
        except Conflict:
            break
    assert taken == sorted(taken)
    assert set(taken) == set(net.hosts()) - {gateway}
    assert net.network_address not in taken
    assert net.broadcast_address not in taken


def test_allocate_ip_full_subnet_raises_conflict() -> None:
    net = IPv4Network("10.50.0.0/30")
    with pytest.raises(Conflict, match="no free address"):
        ipam.allocate_ip(net, addr("10.50.0.1"), [addr("10.50.0.2")])


@pytest.mark.parametrize("requested", ["10.50.0.77", "10.50.0.2", "10.50.0.254"])
def test_allocate_ip_requested_is_honoured(requested: str) -> None:
    taken = [addr("10.50.0.3")]
    assert ipam.allocate_ip(SUBNET, GATEWAY, taken, addr(requested)) == addr(requested)


def test_allocate_ip_requested_taken_raises_already_exists() -> None:
    with pytest.raises(AlreadyExists, match="already in use"):
        ipam.allocate_ip(SUBNET, GATEWAY, [addr("10.50.0.7")], addr("10.50.0.7"))


@pytest.mark.parametrize(("requested", "words"), [
    ("10.51.0.7", "outside"),
    ("192.168.0.2", "outside"),
    ("10.50.0.0", "reserved"),
    ("10.50.0.1", "reserved"),
    ("10.50.0.255", "reserved"),
])
def test_allocate_ip_requested_unusable_raises_invalid_request(requested: str,
                                                               words: str) -> None:
    with pytest.raises(InvalidRequest, match=words) as excinfo:
        ipam.allocate_ip(SUBNET, GATEWAY, [], addr(requested))
    assert excinfo.type is InvalidRequest  # not AlreadyExists / Conflict


# allocate_mac


def test_allocate_mac_is_in_the_hyperv_oui() -> None:
    mac = ipam.allocate_mac([], rng=random.Random(1))
    assert MAC_PATTERN.fullmatch(mac)
    assert mac.startswith(ipam.HYPERV_OUI + ":")


def test_allocate_mac_is_deterministic_with_a_seeded_rng() -> None:
    assert (ipam.allocate_mac([], rng=random.Random(42))
            == ipam.allocate_mac([], rng=random.Random(42)))


def test_allocate_mac_without_rng_uses_system_randomness() -> None:
    assert MAC_PATTERN.fullmatch(ipam.allocate_mac([]))


def test_allocate_mac_avoids_taken() -> None:
    first = ipam.allocate_mac([], rng=random.Random(7))
    second = ipam.allocate_mac([first], rng=random.Random(7))
    assert second != first
    assert MAC_PATTERN.fullmatch(second)


def test_allocate_mac_many_are_unique_and_valid_unicast() -> None:
    rng = random.Random(3)
    taken: set[str] = set()
    for _ in range(300):
        mac = ipam.allocate_mac(taken, rng=rng)
        assert mac not in taken
        assert parse_mac(mac) == mac
        taken.add(mac)
    assert len(taken) == 300


def test_allocate_mac_requested_is_honoured() -> None:
    assert (ipam.allocate_mac(["00:15:5d:00:00:01"], "00:15:5d:aa:bb:cc",
                              random.Random(0)) == "00:15:5d:aa:bb:cc")


def test_allocate_mac_requested_taken_raises_already_exists() -> None:
    with pytest.raises(AlreadyExists, match="already in use"):
        ipam.allocate_mac(["00:15:5d:aa:bb:cc"], "00:15:5d:aa:bb:cc", random.Random(0))


class _StuckRandom(random.Random):
    """Always draws the same 24 bits."""

    def getrandbits(self, k: int) -> int:
        return 0x010203


def test_allocate_mac_gives_up_with_conflict() -> None:
    with pytest.raises(Conflict, match="no free MAC"):
        ipam.allocate_mac(["00:15:5d:01:02:03"], rng=_StuckRandom())
