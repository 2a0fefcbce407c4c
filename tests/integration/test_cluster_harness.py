"""The cluster harness (tests/helpers/cluster.py): hosts joined by an underlay, a real
etcd cluster with a member in each host's namespace, members killed and restarted,
hosts removed, and nothing left afterwards."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from helpers.cluster import (
    BRIDGE,
    HOST_LINK,
    UNDERLAY_GATEWAY,
    Cluster,
    ClusterHost,
    cluster_requirements,
)

from hns.testing import records, remove_stale_sandboxes, wait_until

REASON = cluster_requirements()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def shared() -> Iterator[Cluster]:
    with Cluster(3) as cluster:
        yield cluster


@pytest.fixture
def cluster(shared: Cluster) -> Cluster:
    """The module's cluster with every member running and healthy: a test that kills
    members restarts them, but one that failed half way may not have."""
    for name in ("a", "b", "c"):
        if not shared.etcd.running(name):
            shared.etcd.start(name)
    shared.etcd.wait_healthy()
    return shared


def netns_names() -> set[str]:
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


def alive(pid: int, start_time: int | None) -> bool:
    """Whether the process ``pid`` that started at ``start_time`` still exists."""
    return start_time is not None and records.proc_start_time(pid) == start_time


def put(cluster: Cluster, key: str, value: str, via: str, timeout: float = 5.0) -> bool:
    result = cluster.etcd.ctl("put", key, value, via=via, timeout=timeout)
    return result.returncode == 0 and result.stdout.strip() == "OK"


def get(cluster: Cluster, key: str, via: str) -> str:
    result = cluster.etcd.ctl("get", key, "--print-value-only", via=via)
    assert result.returncode == 0, result.stderr
    return str(result.stdout.strip())


def link(host: ClusterHost) -> dict[str, Any]:
    out = host.run(["ip", "-j", "addr", "show", "dev", HOST_LINK])
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout)[0])


def test_members_form_one_healthy_cluster(cluster: Cluster) -> None:
    health = cluster.etcd.health()
    assert sorted(health) == sorted(cluster.etcd.urls.split(","))
    assert len(health) == 3 and all(health.values()), health
    listed = cluster.etcd.ctl("member", "list", "-w", "json", via="b")
    assert listed.returncode == 0, listed.stderr
    members = json.loads(listed.stdout)["members"]
    assert sorted(m["name"] for m in members) == ["a", "b", "c"]
    assert sorted(u for m in members for u in m["clientURLs"]) == sorted(health)
    assert cluster.etcd.leader() in ("a", "b", "c")


def test_underlay_addresses_and_routes(cluster: Cluster) -> None:
    for host in cluster.hosts:
        info = link(host)
        assert info["mtu"] == 1500 and "UP" in info["flags"]
        assert [(a["local"], a["prefixlen"]) for a in info["addr_info"]
                if a["family"] == "inet"] == [(host.address, 24)]
        route = host.run(["ip", "route", "show", "default"]).stdout
        assert f"via {host.sandbox.outside_ip} dev up0" in route
    bridge = subprocess.run(["ip", "-n", str(cluster.underlay_netns), "-j", "link", "show",
                             "master", BRIDGE], capture_output=True, text=True, check=True)
    assert sorted(p["ifname"] for p in json.loads(bridge.stdout)) == ["ul-a", "ul-b", "ul-c"]


def test_hosts_ping_each_other_over_the_underlay(cluster: Cluster) -> None:
    failed = [(h.name, other.name) for h in cluster.hosts for other in cluster.hosts
              if other is not h and not h.ping(other.address)]
    assert failed == []
    assert all(h.ping(UNDERLAY_GATEWAY) for h in cluster.hosts)


def test_put_through_one_member_is_seen_through_the_others(cluster: Cluster) -> None:
    key, value = f"/harness/{secrets.token_hex(4)}", secrets.token_hex(8)
    assert put(cluster, key, value, via="a")
    assert get(cluster, key, via="b") == value
    assert get(cluster, key, via="c") == value


def test_killed_leader_is_replaced_and_restarts(cluster: Cluster) -> None:
    old = cluster.etcd.leader()
    pid = cluster.etcd.pids()[old]
    started = records.proc_start_time(pid)
    cluster.etcd.kill(old)
    assert not alive(pid, started) and not cluster.etcd.running(old)
    others = [n for n in ("a", "b", "c") if n != old]

    def new_leader() -> str | None:
        try:
            return cluster.etcd.leader()
        except LookupError:
            return None
    assert wait_until(new_leader, timeout=15, what="a new leader") in others
    health = cluster.etcd.health()
    assert [health[cluster.etcd.client_url(n)] for n in ("a", "b", "c")] == \
        [n != old for n in ("a", "b", "c")]
    key, value = f"/harness/{secrets.token_hex(4)}", secrets.token_hex(8)
    assert put(cluster, key, value, via=others[0])
    cluster.etcd.start(old)
    assert cluster.etcd.pids()[old] != pid
    cluster.etcd.wait_healthy()
    assert get(cluster, key, via=old) == value         # it caught up


def test_two_killed_lose_the_quorum_until_restarted(cluster: Cluster) -> None:
    cluster.etcd.kill("b")
    cluster.etcd.kill("c")
    try:
        assert not put(cluster, "/harness/quorum", "lost", via="a", timeout=2)
        assert cluster.etcd.health(timeout=1) == dict.fromkeys(cluster.etcd.urls.split(","),
                                                               False)
    finally:
        cluster.etcd.start("b")
        cluster.etcd.start("c")
    cluster.etcd.wait_healthy()
    value = secrets.token_hex(8)
    assert put(cluster, "/harness/quorum", value, via="a")
    assert get(cluster, "/harness/quorum", via="c") == value


def test_daemon_and_cli_get_the_cluster_environment(cluster: Cluster) -> None:
    host = cluster["b"]
    expected = {"HNS_CLUSTER": cluster.etcd.urls, "HNS_HOST_NAME": "b"}
    assert host.env() == expected
    daemon = host.start_daemon()
    try:
        assert daemon.proc is not None
        with open(f"/proc/{daemon.proc.pid}/environ") as f:
            environ = dict(e.split("=", 1) for e in f.read().split("\0") if "=" in e)
        assert {k: environ.get(k) for k in expected} == expected
        status = host.hnsctl("--json", "status")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["Running"] is True
    finally:
        code = host.stop_daemon()
    assert code == 0, daemon.log_tail()


def leaks(cluster: Cluster, names: list[str], pids: dict[int, int | None]) -> list[str]:
    """What of ``cluster`` is left: namespaces, processes, directories, links, record."""
    found = [f"netns {ns}" for ns in sorted(netns_names() & set(names))]
    found += [f"pid {pid}" for pid, start in pids.items() if alive(pid, start)]
    dirs = [cluster.workdir] + [h.state_dir for h in cluster.hosts]
    found += [f"dir {d}" for d in dirs if d and os.path.exists(d)]
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                                check=True).stdout
    found += [f"link {n}" for n in [f"ul-{h.name}" for h in cluster.hosts]
              if f" {n}@" in root_links or f" {n}:" in root_links]
    found += [f"record {r}" for _, r in records.read_records()
              if r is not None and r.state_dir == cluster.workdir]
    return found


def test_removed_host_leaves_the_others_working_and_close_leaves_nothing() -> None:
    cluster = Cluster(3)
    try:
        names = cluster.namespaces()
        assert set(names) <= netns_names()
        gone = cluster["c"]
        daemon = gone.start_daemon()
        assert daemon.proc is not None
        pids = {pid: records.proc_start_time(pid)
                for pid in [*cluster.etcd.pids().values(), daemon.proc.pid]}
        gone_pids = [daemon.proc.pid, cluster.etcd.pids()["c"]]
        gone.remove()
        gone.remove()                                          # idempotent
        assert not {gone.sandbox.host_netns, gone.sandbox.outside_netns} & netns_names()
        assert not any(alive(pid, pids[pid]) for pid in gone_pids)
        cluster.etcd.wait_healthy()                            # a and b
        assert not cluster.etcd.health()[cluster.etcd.client_url("c")]
        value = secrets.token_hex(8)
        assert put(cluster, "/harness/removed", value, via="a")
        assert get(cluster, "/harness/removed", via="b") == value
        assert cluster["a"].ping(cluster["b"].address)
        assert not cluster["a"].ping(gone.address, wait=1)
        with pytest.raises(RuntimeError, match="removed"):
            gone.start_daemon()
    finally:
        cluster.close()
    cluster.close()                                            # idempotent
    assert leaks(cluster, names, pids) == []


def test_hosts_without_etcd_four_of_them() -> None:
    with Cluster(4, etcd=False, ttl=7) as cluster:
        names = cluster.namespaces()
        assert [h.name for h in cluster.hosts] == ["a", "b", "c", "d"]
        assert cluster["d"].env() == {"HNS_HOST_NAME": "d", "HNS_CLUSTER_TTL": "7"}
        with pytest.raises(RuntimeError, match="no etcd"):
            cluster.etcd.urls  # noqa: B018
        failed = [(h.name, o.name) for h in cluster.hosts for o in cluster.hosts
                  if o is not h and not h.ping(o.address)]
        assert failed == []
    assert leaks(cluster, names, {}) == []


def test_failed_setup_removes_what_it_made() -> None:
    prefix = f"hnsf{secrets.token_hex(3)}-"             # every name it makes starts so
    with pytest.raises(RuntimeError, match=r"etcd member [ab] is not running"):
        Cluster(2, prefix=prefix, etcd_bin="/bin/false")
    assert [ns for ns in netns_names() if ns.startswith(prefix)] == []
    tmp = tempfile.gettempdir()
    assert [d for d in os.listdir(tmp) if prefix in d] == []
    assert [r for _, r in records.read_records() if r is not None and r.prefix == prefix] == []


KILLED_OWNER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from helpers.cluster import Cluster
cluster = Cluster(2, prefix=sys.argv[2])
print(" ".join(str(p) for p in cluster.etcd.pids().values()), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_owner_leftovers_go_with_the_stale_sandboxes() -> None:
    prefix = f"hnsk{secrets.token_hex(3)}-"
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    owner = subprocess.run([sys.executable, "-c", KILLED_OWNER, tests_dir, prefix],
                           capture_output=True, text=True, timeout=120, check=False)
    assert owner.returncode == -9, owner.stderr
    members = [int(p) for p in owner.stdout.split()]
    assert len(members) == 2
    assert [ns for ns in netns_names() if ns.startswith(prefix)] != []
    removed = remove_stale_sandboxes(prefix=prefix)
    assert any(r.endswith("-cl-ul") for r in removed), removed
    assert [ns for ns in netns_names() if ns.startswith(prefix)] == []
    assert [d for d in os.listdir(tempfile.gettempdir()) if prefix in d] == []
    wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in members), timeout=10,
               what="the members of the killed owner to end")
