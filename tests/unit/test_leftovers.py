"""gc's choice of leftovers: by this instance's full ID, never by the short tag alone."""

from __future__ import annotations

from hns.leftovers import leftover_links, leftover_netns, leftover_resolv, tag_in_use

OURS = "hns:0123456789abcdef0123456789abcdef:"
THEIRS = "hns:fedcba9876543210fedcba9876543210:"


def test_unknown_links_go_veths_before_bridges() -> None:
    tagged = ["hba1x", "hva1x", "hba1y", "hva1y"]
    assert leftover_links(tagged, known={"hba1y", "hva1y"}) == ["hva1x", "hba1x"]


def test_a_namespace_is_ours_only_when_its_alias_carries_our_id() -> None:
    tags = {"hns-a1-v1": OURS + "vm-1", "hns-a1-v2": THEIRS + "vm-2", "hns-a1-v3": None,
            "hns-b2-v4": OURS + "vm-4", "hns-a1-v5": OURS + "vm-5"}
    # same tag a1, another instance's ID: kept; no alias: kept; another tag: kept;
    # known to the state: kept
    assert leftover_netns(tags, known={"hns-a1-v5"}, prefix="hns-a1-", owner=OURS) == [
        "hns-a1-v1"]


def test_an_etc_netns_entry_is_ours_only_when_its_resolv_conf_names_our_id() -> None:
    owners = {"hns-a1-v1": "0123456789abcdef0123456789abcdef",
              "hns-a1-v2": "fedcba9876543210fedcba9876543210", "hns-a1-v3": None,
              "hns-a1-v4": "0123456789abcdef0123456789abcdef",
              "hns-a1-v5": "0123456789abcdef0123456789abcdef"}
    # v4's namespace still exists, v5 is a VM of the state
    assert leftover_resolv(owners, known={"hns-a1-v5"}, live_netns={"hns-a1-v4"},
                           prefix="hns-a1-",
                           instance_id="0123456789abcdef0123456789abcdef") == ["hns-a1-v1"]


def test_a_tag_is_in_use_when_any_of_its_objects_exists() -> None:
    def used(namespaces: tuple[str, ...] = (), entries: tuple[str, ...] = (),
             tables: tuple[str, ...] = ()) -> bool:
        return tag_in_use("hns-a1-", "inet hns-a1", namespaces, entries, tables)

    assert not used()
    assert not used(("hns-b2-v",), ("hns-b2-v",), ("inet hns-b2", "inet filter"))
    assert used(namespaces=("hns-a1-v",))
    assert used(entries=("hns-a1-v",))
    assert used(tables=("inet hns-a1",))
    assert used(tables=("inet hns-a1-mirror",))
