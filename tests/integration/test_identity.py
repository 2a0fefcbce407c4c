"""Instance identity: a new state directory never takes a tag whose kernel objects exist,
and ``gc`` touches only objects that carry its own full instance ID, even when another
state directory has the same 16-bit tag."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from hns.resolv import ETC_NETNS
from hns.service import Service
from hns.testing import Sandbox


def test_a_new_state_dir_never_takes_a_tag_in_use(hns_sandbox: Sandbox, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    hns_sandbox.service.create_network("n", "nat")
    hns_sandbox.vm("v", "n")                    # a namespace named with the tag
    taken = hns_sandbox.service.instance
    draws = iter([taken, taken])                # the first two draws collide
    real = secrets.token_hex

    def token_hex(nbytes: int) -> str:
        if nbytes == 2:                         # the tag; the 16-byte ID is left alone
            return next(draws, None) or real(nbytes)
        return real(nbytes)

    monkeypatch.setattr("hns.store.secrets.token_hex", token_hex)
    with Service(tmp_path / "other", hns_sandbox.host_netns) as other:
        assert other.instance != taken
    assert next(draws, None) is None            # both colliding draws were refused


def snapshot(sandbox: Sandbox) -> dict[str, Any]:
    links = json.loads(sandbox.host.run(["ip", "-j", "-d", "link", "show"]).stdout)
    vm = sandbox.vms[0].info
    return {
        "links": sorted((link["ifname"], link.get("ifalias", "")) for link in links),
        "netns": os.path.exists(f"/run/netns/{vm.netns}"),
        "resolv": os.path.exists(os.path.join(ETC_NETNS, vm.netns, "resolv.conf")),
        "nft": sandbox.host.run(["nft", "list", "table", "inet",
                                 f"hns-{sandbox.service.instance}"]).stdout,
    }


def test_gc_of_a_state_dir_with_the_same_tag_removes_nothing_of_the_other(
        hns_sandbox: Sandbox, tmp_path: Path) -> None:
    svc = hns_sandbox.service
    svc.create_network("n", "nat")
    vm = hns_sandbox.vm("v", "n")
    before = snapshot(hns_sandbox)
    assert before["netns"] and before["resolv"] and before["nft"]

    # the collision a 16-bit tag allows (two state directories made before the check,
    # or copied): a second state directory with this one's tag and its own ID
    state = tmp_path / "other"
    Service(state, hns_sandbox.host_netns).close()
    with sqlite3.connect(state / "hns.db") as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'instance'", (svc.instance,))
    with Service(state, hns_sandbox.host_netns) as other:
        assert other.instance == svc.instance and other.instance_id != svc.instance_id
        assert other.gc(dry_run=True) == []
        assert other.gc() == []

    assert snapshot(hns_sandbox) == before
    ping = vm.run(["ping", "-c", "1", "-W", "5", str(vm.gateway)])
    assert ping.returncode == 0, ping.stdout
    assert svc.gc(dry_run=True) == []           # and the owner finds nothing to remove
