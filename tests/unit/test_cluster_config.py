"""Which cluster a command names, and as which host (pure)."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from hns.cluster.config import DEFAULT_TTL, cluster_config
from hns.errors import InvalidRequest


def test_no_cluster_named_is_none() -> None:
    assert cluster_config(None, None, None, None, "hostns") is None
    assert cluster_config("  ", None, None, None, None) is None


def test_the_host_name_defaults_to_the_host_namespace() -> None:
    found = cluster_config("http://10.0.0.1:2379", None, None, None, "hostns-a")
    assert found is not None
    assert found.host == "hostns-a" and found.ttl == DEFAULT_TTL and found.address is None
    assert found.endpoints == ("http://10.0.0.1:2379",)


def test_every_part_given() -> None:
    found = cluster_config("http://a:1,http://b:2", "h1", "3", "192.168.250.11", None)
    assert found is not None
    assert (found.host, found.ttl, found.address) == ("h1", 3, IPv4Address("192.168.250.11"))


@pytest.mark.parametrize(("ttl", "address"), [("1", None), ("3601", None), ("x", None),
                                              (None, "not-an-address"), (None, "::1")])
def test_bad_values_are_refused(ttl: str | None, address: str | None) -> None:
    with pytest.raises(InvalidRequest):
        cluster_config("http://a:2379", "h", ttl, address, None)


def test_cluster_values_without_a_cluster_wait_for_one() -> None:
    assert cluster_config(None, "h", "3", "10.0.0.1", None) is None
