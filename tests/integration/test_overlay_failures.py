"""Overlay networks when things break (docs/overlay.md, "Failures"): hosts that go away,
etcd members down, quorum lost, daemons restarted, compacted watch revisions, bad input.

Tests that destroy a host build a cluster of their own with a short lease TTL (the lease
of a host that is gone runs out fast); the others share one cluster (TTL 10 s, the
default: a daemon killed and restarted must come back within the TTL even on a loaded
machine) which the ``shared`` fixture hands over with every member and daemon running.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from helpers.cluster import (
    HOST_LINK,
    UNDERLAY_GATEWAY,
    Cluster,
    ClusterHost,
    cluster_requirements,
)
from helpers.overlay import (
    OverlaySetup,
    OverlayVm,
    cluster_status,
    create_vm,
    daemon_cluster,
    delete_vms,
    dismantle,
    entries,
    error_line,
    etcd_endpoints,
    move_leader_off,
    ok,
    overlay_cluster,
    ping,
    revision,
    setup_network,
    start_daemons,
    vm_names,
    wait_converged,
    wait_joined,
)

from hns.testing import Sandbox, wait_until

REASON = cluster_requirements()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

NET = "ov"
SHORT_TTL = 3
SHARED_TTL = 10


@pytest.fixture(scope="module")
def module_setup() -> Iterator[OverlaySetup]:
    with overlay_cluster(3, ttl=SHARED_TTL) as cluster:
        yield setup_network(cluster, NET)


@pytest.fixture
def shared(module_setup: OverlaySetup) -> OverlaySetup:
    """The module's cluster with every member healthy and every daemon joined (a test
    that failed half way may have left one down)."""
    cluster = module_setup.cluster
    for host in cluster.hosts:
        if not cluster.etcd.running(host.name):
            cluster.etcd.start(host.name)
    cluster.etcd.wait_healthy()
    start_daemons(cluster)
    return module_setup


def token() -> str:
    return secrets.token_hex(3)


def holds(host: ClusterHost, net_id: str, vm: OverlayVm) -> bool:
    """Whether ``host``'s VXLAN device has an entry of ``vm`` (FDB or neighbour)."""
    have = entries(host, net_id)
    assert have is not None, f"no VXLAN device of the network on host {host.name}"
    return any(mac == vm.mac for mac, _ in have.fdb) or any(ip == vm.ip for ip, _ in have.neigh)


def links(host: ClusterHost) -> list[str]:
    out = ok(host.run(["ip", "-o", "link", "show"]))
    return sorted(line.split(":")[1].split("@")[0].strip() for line in out.splitlines())


def netns_list() -> set[str]:
    return set(ok(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                 check=False)).split())


def refuse_new_etcd_connections(host: ClusterHost) -> None:
    """New TCP connections from ``host`` to etcd's client port get a reset: what the
    host's own cleanup would delete through etcd, a host that is gone cannot."""
    rules = ("add table inet ovtest\n"
             "add chain inet ovtest out { type filter hook output priority 0; }\n"
             "add rule inet ovtest out tcp dport 2379 ct state new reject with tcp reset\n")
    ok(host.run(["nft", "-f", "-"], input=rules))


def cut_off(host: ClusterHost) -> None:
    """Power lost: the host's underlay link gone at once (nothing it sends gets out, not
    even a FIN), then the host removed (its cleanup cannot reach etcd either: with the
    underlay unreachable it fails at once)."""
    ok(host.run(["ip", "link", "del", HOST_LINK]))
    underlay = ipaddress.ip_network(f"{UNDERLAY_GATEWAY}/24", strict=False)
    ok(host.run(["ip", "route", "add", "unreachable", str(underlay)]))
    host.remove()


@contextlib.contextmanager
def dismantled(cluster: Cluster) -> Iterator[None]:
    try:
        yield
    finally:
        dismantle(cluster)


def host_lease(setup: OverlaySetup, name: str, via: str) -> int:
    """The lease that holds host ``name``'s record in etcd (0: no record)."""
    found = json.loads(ok(setup.cluster.etcd.ctl("get", f"/hns/v1/hosts/{name}", "-w", "json",
                                                 via=via)))
    return int(found["kvs"][0].get("lease", 0)) if found.get("kvs") else 0


# --- a host goes away ------------------------------------------------------------------------


def test_removed_host_leaves_the_others_within_the_ttl() -> None:
    with overlay_cluster(3, ttl=SHORT_TTL) as cluster:
        setup = setup_network(cluster, NET)
        leader = cluster.etcd.leader()
        # not the leader (an election would extend the leases) and not the first
        # endpoint, the one the daemons' clients talk to (the cut-off test's case)
        victim = cluster[next(n for n in ("c", "b") if n != leader)]
        gone = [setup.vms[victim.name], create_vm(victim, f"x{token()}", NET)]
        others = [h for h in cluster.hosts if h is not victim]
        wait_converged(cluster, NET, setup.net_id)
        assert all(holds(h, setup.net_id, vm) for h in others for vm in gone)
        refuse_new_etcd_connections(victim)

        start = time.monotonic()
        victim.remove()
        wait_until(lambda: not any(holds(h, setup.net_id, vm) for h in others for vm in gone),
                   timeout=5 * SHORT_TTL, what=f"the entries of host {victim.name} to go")
        elapsed = time.monotonic() - start
        assert elapsed <= SHORT_TTL + 1, f"{elapsed:.2f} s"

        records = etcd_endpoints(cluster)
        assert [k for k, r in records.items() if r["Host"] == victim.name] == []
        assert ok(cluster.etcd.ctl("get", f"/hns/v1/hosts/{victim.name}")) == ""
        wait_converged(cluster, NET, setup.net_id, hosts=others)
        assert ping(setup.vms[others[0].name], setup.vms[others[1].name].ip)
        listed = [h["Name"] for h in cluster_status(others[0])["Hosts"]]
        assert sorted(listed) == sorted(h.name for h in others)


def test_expired_lease_refuses_creates_until_the_daemon_joins_again() -> None:
    with overlay_cluster(2, ttl=SHORT_TTL) as cluster:
        setup = setup_network(cluster, NET)
        a, b = cluster["a"], cluster["b"]
        va, vb = setup.vms["a"], setup.vms["b"]
        old = wait_joined(b)
        b.kill_daemon()
        wait_until(lambda: ok(cluster.etcd.ctl("get", "/hns/v1/hosts/b")) == "",
                   timeout=5 * SHORT_TTL, what="the lease of host b to run out")
        wait_until(lambda: not holds(a, setup.net_id, vb), timeout=10,
                   what="host a to drop the entries of b's VM")
        names, records = vm_names(b), etcd_endpoints(cluster)
        refused = b.hnsctl("vm", "create", f"r{token()}", "--network", NET)
        assert "lease" in error_line(refused, 1)
        assert (vm_names(b), etcd_endpoints(cluster)) == (names, records)

        b.start_daemon()
        assert wait_joined(b) != old                            # a new session
        records = wait_converged(cluster, NET, setup.net_id)     # b's VM put again
        assert sorted(r["Name"] for r in records.values()) == sorted([va.name, vb.name])
        assert ping(va, vb.ip)
        later = create_vm(b, f"l{token()}", NET)
        wait_converged(cluster, NET, setup.net_id)
        assert ping(va, later.ip)


def test_cut_off_host_leaves_the_others_within_the_ttl_and_costs_them_nothing() -> None:
    """The host whose member the daemons' clients use goes silent (no FIN): their watch
    and keepalives must move to another member in time."""
    with Cluster(3, ttl=SHORT_TTL) as cluster, dismantled(cluster):
        a = cluster["a"]       # the first endpoint: the daemons' clients use it from the
        move_leader_off(cluster, "a")      # start, and no leader change moves them off
        start_daemons(cluster)
        setup = setup_network(cluster, NET)
        others = [cluster["b"], cluster["c"]]
        leases = {h.name: host_lease(setup, h.name, via="b") for h in others}
        assert all(leases.values())
        start = time.monotonic()
        cut_off(a)
        wait_until(lambda: not any(holds(h, setup.net_id, setup.vms["a"]) for h in others),
                   timeout=5 * SHORT_TTL, what="the entries of host a to go")
        elapsed = time.monotonic() - start
        assert elapsed <= SHORT_TTL + 1, f"{elapsed:.2f} s"
        assert [r for r in etcd_endpoints(cluster).values() if r["Host"] == "a"] == []
        # the healthy leases outlive the silent member: compared once a TTL has passed
        # (a span of time, so it is waited out)
        wait_until(lambda: time.monotonic() - start >= SHORT_TTL + 1, timeout=SHORT_TTL + 2,
                   what="one TTL to pass")
        assert {n: host_lease(setup, n, via="b") for n in leases} == leases
        wait_converged(cluster, NET, setup.net_id, hosts=others)
        assert ping(setup.vms["b"], setup.vms["c"].ip)


# --- etcd members down -----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["follower", "cli-host"])
def test_one_member_down_creates_deletes_and_pings_still_work(shared: OverlaySetup,
                                                             which: str) -> None:
    cluster, a = shared.cluster, shared.host("a")              # the CLI runs on host a
    down = "a" if which == "cli-host" else \
        next(n for n in ("b", "c") if n != cluster.etcd.leader())
    cluster.etcd.kill(down)
    made: list[OverlayVm] = []
    try:
        up = [h.name for h in cluster.hosts if h.name != down]
        cluster.etcd.wait_healthy(up)
        made.append(create_vm(a, f"k{token()}", NET))
        made.append(create_vm(cluster[down], f"k{token()}", NET))
        wait_converged(cluster, NET, shared.net_id)
        assert all(ping(shared.vms[n], vm.ip) for n in ("b", "c") for vm in made)
        ok(a.hnsctl("vm", "delete", made[0].name))
        assert made[0].name not in vm_names(a)
        records = wait_converged(cluster, NET, shared.net_id)
        assert made[0].ip not in {r["IpAddress"] for r in records.values()}
    finally:
        delete_vms(made)
        cluster.etcd.start(down)
    cluster.etcd.wait_healthy()


def test_quorum_lost_keeps_traffic_and_refuses_changes_cleanly(shared: OverlaySetup) -> None:
    cluster, a, b = shared.cluster, shared.host("a"), shared.host("b")
    va, vb, vc = (shared.vms[n] for n in ("a", "b", "c"))
    new = f"q{token()}"
    before = {h.name: (vm_names(h), links(h)) for h in cluster.hosts}
    cluster.etcd.kill("b")
    cluster.etcd.kill("c")
    try:
        assert ping(va, vb.ip) and ping(vb, vc.ip) and ping(vc, va.ip)
        created = a.hnsctl("vm", "create", new, "--network", NET)
        assert "etcd" in error_line(created, 1)
        deleted = b.hnsctl("vm", "delete", vb.name)
        assert "etcd" in error_line(deleted, 1)
        assert {h.name: (vm_names(h), links(h)) for h in cluster.hosts} == before
        assert [ns for ns in netns_list() if ns.endswith(f"-{new}")] == []
        assert ping(va, vb.ip) and ping(vc, vb.ip)
    finally:
        cluster.etcd.start("b")
        cluster.etcd.start("c")
    cluster.etcd.wait_healthy()
    vm = create_vm(a, new, NET)
    try:
        records = wait_converged(cluster, NET, shared.net_id)
        assert {r["Name"] for r in records.values()} >= {va.name, vb.name, vc.name, new}
        assert ping(vb, vm.ip) and ping(vc, vm.ip)
    finally:
        delete_vms([vm])


# --- daemons restarted -----------------------------------------------------------------------


def test_daemon_restarts_keep_the_lease_and_exact_entries(shared: OverlaySetup) -> None:
    cluster, b, c = shared.cluster, shared.host("b"), shared.host("c")
    lease = wait_joined(b)
    assert b.stop_daemon() == 0
    late = create_vm(c, f"t{token()}", NET)          # made while b's daemon is down
    try:
        b.start_daemon()
        assert wait_joined(b) == lease
        wait_converged(cluster, NET, shared.net_id)       # exact: none twice, none lost
        assert ping(shared.vms["b"], late.ip) and ping(late, shared.vms["a"].ip)

        lease = wait_joined(c)
        c.kill_daemon()
        c.start_daemon()
        assert wait_joined(c) == lease
        status = daemon_cluster(c)
        assert status["Error"] is None and status["Networks"][NET] > 0
        wait_converged(cluster, NET, shared.net_id)
        assert ping(late, shared.vms["b"].ip)
    finally:
        delete_vms([late])
    wait_converged(cluster, NET, shared.net_id)


# --- a compacted watch revision --------------------------------------------------------------

WATCH = """
import sys
from hns.cluster.etcd import Etcd, WatchLost
etcd = Etcd([sys.argv[1]])
try:
    for event in etcd.watch(sys.argv[2], int(sys.argv[3])):
        print("event", event.kv.key)
except WatchLost as exc:
    print("lost", exc.compacted)
"""


def test_compacted_watch_revision_is_reported_and_the_daemons_go_on(
        shared: OverlaySetup) -> None:
    cluster, a, b = shared.cluster, shared.host("a"), shared.host("b")
    old = revision(cluster)
    vm = create_vm(b, f"w{token()}", NET)
    delete_vms([vm])
    now = revision(cluster)
    assert now > old
    ok(cluster.etcd.ctl("compact", str(now)))
    url = cluster.etcd.client_url("a")
    watched = a.run([sys.executable, "-c", WATCH, url, "/hns/v1/", str(old + 1)], timeout=30)
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.split() == ["lost", str(now)]
    after = create_vm(shared.host("c"), f"w{token()}", NET)     # the daemons still watch
    try:
        wait_converged(cluster, NET, shared.net_id)
        assert ping(shared.vms["a"], after.ip)
    finally:
        delete_vms([after])


# --- bad input -------------------------------------------------------------------------------


def cluster_state(setup: OverlaySetup) -> dict[str, object]:
    """What a refused command must not change: each host's networks, VMs and links (the
    state through the service, as ``network list`` and ``vm list`` read it), and etcd's
    records."""
    found: dict[str, object] = {}
    for host in setup.cluster.hosts:
        svc = host.sandbox.service
        found[host.name] = ([n.to_json() for n in svc.list_networks()],
                            [v.to_json() for v in svc.list_vms()], links(host))
    found["etcd"] = ok(setup.cluster.etcd.ctl("get", "--prefix", "--keys-only", "/hns/v1/"))
    return found


def test_overlay_subnet_overlapping_a_host_route_is_refused(shared: OverlaySetup) -> None:
    before = cluster_state(shared)
    for subnet in ("192.168.250.0/25", "192.168.0.0/16"):      # the underlay's /24
        result = shared.host("b").hnsctl("network", "create", f"s{token()}", "--type",
                                         "overlay", "--subnet", subnet)
        assert "overlaps" in error_line(result, 2)
    assert cluster_state(shared) == before


def test_bad_vni_mac_and_cluster_urls_are_refused(shared: OverlaySetup) -> None:
    c = shared.host("c")
    before = cluster_state(shared)
    overlay = ("network", "create", f"n{token()}", "--type", "overlay", "--subnet",
               "10.250.0.0/16")
    for argv in ([*overlay, "--vni", "0"], [*overlay, "--vni", "99999999"],
                 [*overlay, "--vni", "x"],
                 ["network", "create", f"n{token()}", "--type", "nat", "--vni", "5001"],
                 ["vm", "create", f"m{token()}", "--network", NET, "--mac",
                  "00:15:5d:12:34:56"]):
        error_line(c.hnsctl(*argv), 2)
    for url in ("ftp://x", "http://192.168.250.1", "http://:2379"):
        error_line(c.hnsctl(*overlay, env={"HNS_CLUSTER": url}), 2)
    assert cluster_state(shared) == before


def test_unreachable_etcd_at_create_makes_nothing(shared: OverlaySetup) -> None:
    c = shared.host("c")
    before = cluster_state(shared)
    nowhere = f"http://{UNDERLAY_GATEWAY}:2399"     # the underlay's own address: no etcd
    try:
        result = c.hnsctl("network", "create", f"u{token()}", "--type", "overlay",
                          "--subnet", "10.251.0.0/16", env={"HNS_CLUSTER": nowhere})
        assert "etcd" in error_line(result, 1)
        assert cluster_state(shared) == before
    finally:     # the host remembers the cluster named last: name the real one again
        ok(c.hnsctl("cluster", "status"))


def test_overlay_network_without_a_cluster_is_refused() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HNS_")}
    with Sandbox() as sandbox:
        result = sandbox.hnsctl("network", "create", "o", "--type", "overlay", "--subnet",
                                "10.240.0.0/16", env=env)
        assert "cluster" in error_line(result, 2)
        assert ok(sandbox.hnsctl("--json", "network", "list", env=env)).strip() == "[]"
        assert not [n for n in links_of(sandbox) if n.startswith(("hb", "hx"))]


def links_of(sandbox: Sandbox) -> list[str]:
    out = ok(sandbox.host.run(["ip", "-o", "link", "show"]))
    return [line.split(":")[1].split("@")[0].strip() for line in out.splitlines()]
