"""hns.naming: kernel object names fit the kernel and carry the instance tag."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from hns import naming
from hns.store import Store

IFNAMSIZ = 15  # without the terminating NUL

INSTANCES = ["ab12", "0000", "ffff", "9c3e"]
IDS = [str(uuid.UUID(int=0)), str(uuid.UUID(int=2**128 - 1)),
       "0b7e3c1a-5d2f-4e6a-9b8c-1d2e3f405162", "12345678", "1-2-3-4-5-6-7-8-9"]

IfnameFunc = Callable[[str, str], str]


@pytest.mark.parametrize("make", [naming.bridge_name, naming.host_veth_name],
                         ids=["bridge", "veth"])
@pytest.mark.parametrize("instance", INSTANCES)
@pytest.mark.parametrize("object_id", IDS)
def test_interface_names_fit_and_carry_the_instance(make: IfnameFunc, instance: str,
                                                    object_id: str) -> None:
    name = make(instance, object_id)
    assert len(name) <= IFNAMSIZ
    assert instance in name
    assert name == make(instance, object_id)
    assert "/" not in name
    assert not any(c.isspace() for c in name)


@pytest.mark.parametrize("make", [naming.bridge_name, naming.host_veth_name],
                         ids=["bridge", "veth"])
def test_interface_names_fit_for_many_random_ids(make: IfnameFunc) -> None:
    for _ in range(200):
        assert len(make("ab12", str(uuid.uuid4()))) <= IFNAMSIZ


def test_names_with_a_real_instance_tag(tmp_path: Path) -> None:
    store = Store(tmp_path)
    try:
        name = naming.bridge_name(store.instance, str(uuid.uuid4()))
    finally:
        store.close()
    assert len(name) <= IFNAMSIZ
    assert store.instance in name


def test_exact_names() -> None:
    object_id = "0b7e3c1a-5d2f-4e6a-9b8c-1d2e3f405162"
    assert naming.bridge_name("ab12", object_id) == "hbab120b7e3c1a"
    assert naming.host_veth_name("ab12", object_id) == "hvab120b7e3c1a"
    assert naming.vm_netns_name("ab12", "wsl") == "hns-ab12-wsl"
    assert naming.netns_prefix("ab12") == "hns-ab12-"
    assert naming.nft_table_name("ab12") == "hns-ab12"
    assert naming.instance_alias_prefix("ab12") == "hns:ab12:"
    assert naming.link_alias("ab12", object_id) == f"hns:ab12:{object_id}"


def test_bridge_and_veth_never_collide() -> None:
    object_id = str(uuid.uuid4())
    assert naming.bridge_name("ab12", object_id) != naming.host_veth_name("ab12", object_id)


def test_instances_do_not_share_names() -> None:
    object_id = str(uuid.uuid4())
    assert naming.bridge_name("ab12", object_id) != naming.bridge_name("ab13", object_id)
    assert naming.vm_netns_name("ab12", "wsl") != naming.vm_netns_name("ab13", "wsl")
    assert naming.nft_table_name("ab12") != naming.nft_table_name("ab13")


def test_netns_and_alias_belong_to_their_instance_prefix() -> None:
    object_id = str(uuid.uuid4())
    assert naming.vm_netns_name("ab12", "x").startswith(naming.netns_prefix("ab12"))
    assert naming.link_alias("ab12", object_id).startswith(
        naming.instance_alias_prefix("ab12"))
    assert naming.link_alias("ab12", object_id).startswith(naming.ALIAS_PREFIX)
    # one instance's prefix must not match another's names
    assert not naming.vm_netns_name("ab123", "x").startswith(naming.netns_prefix("ab12"))
    assert not naming.link_alias("ab123", object_id).startswith(
        naming.instance_alias_prefix("ab12"))


def test_names_are_deterministic() -> None:
    object_id = str(uuid.uuid4())
    assert [naming.bridge_name("ab12", object_id) for _ in range(3)] == [
        naming.bridge_name("ab12", object_id)] * 3
    assert naming.short_id(object_id) == object_id.replace("-", "")[:8]
