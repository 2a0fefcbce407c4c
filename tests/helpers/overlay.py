"""Helpers for the overlay tests: the CLI on cluster hosts, VMs as namespaces, the static
entries of the hosts' VXLAN devices and the endpoint records in etcd.

An overlay VM is addressed by its :class:`OverlayVm` (host, name, address, MAC,
namespace); a namespace is entered with :class:`hns.testing.Peer`, whose processes the
caller stops (``stop_processes``).  Entries are read from the kernel with ``bridge`` and
``ip`` in the host's namespace, and compared with what etcd says they must be.
"""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from helpers.cluster import Cluster, ClusterHost
from hns.testing import Peer, wait_until

__all__ = ["ENDPOINTS", "SUBNET", "Entries", "OverlaySetup", "OverlayVm", "cluster_status",
           "create_network", "create_vm", "daemon_cluster", "delete_vms", "dismantle",
           "entries", "error_line", "etcd_endpoints", "expected_entries", "move_leader_off",
           "network_show", "ok", "overlay_cluster", "ping", "revision", "setup_network",
           "start_daemons", "vm_from_json", "vm_names", "vm_show", "vxlan_devices",
           "wait_converged", "wait_joined"]

SUBNET = "10.240.0.0/16"
ENDPOINTS = "/hns/v1/endpoints/"
ZERO_MAC = "00:00:00:00:00:00"


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that must have succeeded."""
    assert result.returncode == 0, f"{result.args}: rc={result.returncode} {result.stderr}"
    return result.stdout


def error_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The one error line of an ``hnsctl`` that must have failed with exit ``code``."""
    lines = result.stderr.splitlines()
    assert result.returncode == code and len(lines) == 1, \
        f"{result.args}: rc={result.returncode} stderr={result.stderr!r}"
    assert "hnsctl: error:" in lines[0], lines[0]
    return lines[0]


def _json(host: ClusterHost, *args: str) -> Any:
    return json.loads(ok(host.hnsctl("--json", *args)))


# --- daemons ---------------------------------------------------------------------------------


def daemon_cluster(host: ClusterHost) -> dict[str, Any]:
    """The "Cluster" object of the host's daemon status ({} when it does not answer)."""
    result = host.hnsctl("--json", "status")
    if result.returncode != 0:
        return {}
    with contextlib.suppress(ValueError):
        return dict(json.loads(result.stdout).get("Cluster") or {})
    return {}


def wait_joined(host: ClusterHost, timeout: float = 20.0) -> int:
    """Until the host's daemon holds a lease and watches; the lease."""
    def joined() -> int:
        found = daemon_cluster(host)
        return int(found.get("Lease") or 0) if found.get("Watching") else 0
    return wait_until(joined, timeout=timeout, interval=0.1,
                      what=f"the daemon of host {host.name} to join the cluster")


def start_daemons(cluster: Cluster) -> None:
    """The daemons of the present hosts that do not run, until each has joined.  Started
    from this thread: a daemon gets SIGTERM when the thread that started it ends
    (``setpriv --pdeathsig``)."""
    idle = [h for h in cluster.hosts
            if not h.removed and (h.daemon is None or not h.daemon.running)]
    for host in idle:
        host.start_daemon()
    for host in idle:
        wait_joined(host)


@contextlib.contextmanager
def overlay_cluster(hosts: int = 3, ttl: int | None = None) -> Iterator[Cluster]:
    """A cluster whose daemons have joined; dismantled (:func:`dismantle`), then closed."""
    with Cluster(hosts, ttl=ttl) as cluster:
        try:
            start_daemons(cluster)
            yield cluster
        finally:
            dismantle(cluster)


def dismantle(cluster: Cluster) -> None:
    """Best effort, while etcd still runs: the daemons stopped, then every VM and network
    deleted on its host (the cluster's close would otherwise wait for an etcd it has
    stopped already)."""
    present = [h for h in cluster.hosts if not h.removed]
    for host in present:
        with contextlib.suppress(Exception):
            host.kill_daemon()
    if not any(cluster.etcd.running(h.name) for h in present):
        return
    for what in ("vms", "networks"):
        for host in present:
            try:
                svc = host.sandbox.service
                if what == "vms":
                    for vm in svc.list_vms():
                        svc.delete_vm(vm.name)
                else:
                    for net in svc.list_networks():
                        svc.delete_network(net.name, force=True)
            except Exception as exc:     # the sandbox's close removes what stays
                print(f"overlay tests: dismantling host {host.name}: {exc}", file=sys.stderr)


def revision(cluster: Cluster) -> int:
    """etcd's current revision."""
    return int(json.loads(ok(cluster.etcd.ctl("get", "/", "-w", "json")))["header"]["revision"])


def move_leader_off(cluster: Cluster, name: str) -> str:
    """Make sure member ``name`` is not etcd's leader (``etcdctl move-leader``); the
    leader's name."""
    leader = cluster.etcd.leader()
    if leader != name:
        return leader
    found = json.loads(ok(cluster.etcd.ctl("endpoint", "status", "-w", "json")))
    ids = {e["Endpoint"]: int(e["Status"]["header"]["member_id"]) for e in found}
    target = next(h.name for h in cluster.hosts if h.name != name and not h.removed)
    ok(cluster.etcd.ctl("move-leader", f"{ids[cluster.etcd.client_url(target)]:x}", via=name))

    def other_leader() -> str | None:
        with contextlib.suppress(LookupError):
            found = cluster.etcd.leader()
            return found if found != name else None
        return None
    return str(wait_until(other_leader, timeout=10, what=f"the leadership to leave {name}"))


def cluster_status(host: ClusterHost) -> dict[str, Any]:
    return dict(json.loads(ok(host.hnsctl("cluster", "status", "--json"))))


# --- networks and VMs ------------------------------------------------------------------------


def create_network(host: ClusterHost, name: str, subnet: str = SUBNET,
                   *extra: str) -> dict[str, Any]:
    return dict(_json(host, "network", "create", name, "--type", "overlay", "--subnet",
                      subnet, *extra))


def network_show(host: ClusterHost, name: str) -> dict[str, Any]:
    return dict(_json(host, "network", "show", name))


@dataclass(frozen=True)
class OverlayVm:
    host: ClusterHost
    name: str
    id: str
    ip: str
    mac: str
    netns: str
    mtu: int

    @property
    def peer(self) -> Peer:
        return Peer(self.netns)

    def run(self, *argv: str, timeout: float = 30,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """``argv`` inside the VM's namespace, output captured."""
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True,
                              text=True, timeout=timeout, check=False, input=input)


def vm_from_json(host: ClusterHost, info: dict[str, Any]) -> OverlayVm:
    """The VM ``vm show --json`` (or ``vm create --json``) on ``host`` described."""
    return OverlayVm(host, info["Name"], info["ID"], info["IpAddress"], info["MacAddress"],
                     info["NetNs"], int(info["Mtu"]))


@dataclass(frozen=True)
class OverlaySetup:
    """A cluster with one overlay network and a VM ``v<host>`` on each host."""

    cluster: Cluster
    network: str
    net_id: str
    vms: dict[str, OverlayVm]          # host name -> its VM

    def host(self, name: str) -> ClusterHost:
        return self.cluster[name]


def setup_network(cluster: Cluster, network: str, subnet: str = SUBNET) -> OverlaySetup:
    """The network made on the first host, a VM on every host, the entries converged."""
    net = create_network(cluster.hosts[0], network, subnet)
    vms = {h.name: create_vm(h, f"v{h.name}", network) for h in cluster.hosts}
    wait_converged(cluster, network, net["ID"])
    return OverlaySetup(cluster, network, net["ID"], vms)


def create_vm(host: ClusterHost, name: str, network: str) -> OverlayVm:
    return vm_from_json(host, _json(host, "vm", "create", name, "--network", network))


def vm_show(host: ClusterHost, name: str) -> OverlayVm:
    return vm_from_json(host, _json(host, "vm", "show", name))


def vm_names(host: ClusterHost) -> set[str]:
    return {v["Name"] for v in _json(host, "vm", "list")}


def delete_vms(vms: list[OverlayVm]) -> None:
    """Best effort (a cleanup): each VM deleted on its host, through the host's service
    in this process (no program started per VM)."""
    for vm in vms:
        if not vm.host.removed:
            try:
                vm.host.sandbox.service.delete_vm(vm.name)
            except Exception as exc:
                print(f"overlay tests: deleting vm {vm.name}: {exc}", file=sys.stderr)


def ping(vm: OverlayVm, address: str, count: int = 1, wait: int = 2, *extra: str) -> bool:
    result = vm.run("ping", "-n", "-q", "-c", str(count), "-W", str(wait), *extra, address)
    return result.returncode == 0


# --- static entries --------------------------------------------------------------------------


@dataclass(frozen=True)
class Entries:
    """One VXLAN device's remote entries, as lists (a duplicate would show twice)."""

    fdb: tuple[tuple[str, str], ...]           # (MAC, VTEP), sorted
    neigh: tuple[tuple[str, str], ...]         # (IP, MAC) of permanent entries, sorted
    flood: int = 0                             # all-zero FDB entries (there must be none)


def vxlan_devices(host: ClusterHost) -> dict[str, str]:
    """Network ID -> the name of its VXLAN device on ``host`` (by the device's alias)."""
    out = ok(host.run(["ip", "-j", "-d", "link", "show", "type", "vxlan"]))
    return {str(link.get("ifalias", "")).rsplit(":", 1)[-1]: link["ifname"]
            for link in json.loads(out or "[]")}


def entries(host: ClusterHost, network_id: str) -> Entries | None:
    """The entries of the network's VXLAN device on ``host`` (None: no such device)."""
    device = vxlan_devices(host).get(network_id)
    if device is None:
        return None
    fdb = json.loads(ok(host.run(["bridge", "-j", "fdb", "show", "dev", device])) or "[]")
    remote = sorted((e["mac"], e["dst"]) for e in fdb if "dst" in e and e["mac"] != ZERO_MAC)
    flood = sum(1 for e in fdb if e["mac"] == ZERO_MAC)
    neigh = json.loads(ok(host.run(["ip", "-j", "-4", "neigh", "show", "dev", device, "nud",
                                    "permanent"])) or "[]")
    return Entries(tuple(remote), tuple(sorted((n["dst"], n.get("lladdr", "")) for n in neigh)),
                   flood)


def etcd_endpoints(cluster: Cluster, network: str | None = None,
                   via: str | None = None) -> dict[str, dict[str, Any]]:
    """The endpoint records in etcd (of one network, or all): key -> record; ``via``:
    through that member only."""
    prefix = ENDPOINTS + (f"{network}/" if network else "")
    out = ok(cluster.etcd.ctl("get", "--prefix", prefix, "-w", "json", via=via))
    kvs = json.loads(out).get("kvs", [])
    return {base64.b64decode(kv["key"]).decode(): json.loads(base64.b64decode(kv["value"]))
            for kv in kvs}


def expected_entries(records: dict[str, dict[str, Any]], host: str) -> Entries:
    """What a host's device must hold: the entries of every other host's endpoints."""
    others = [r for r in records.values() if r["Host"] != host]
    return Entries(tuple(sorted((r["MacAddress"], r["Vtep"]) for r in others)),
                   tuple(sorted((r["IpAddress"], r["MacAddress"]) for r in others)))


def wait_converged(cluster: Cluster, network: str, network_id: str, timeout: float = 15.0,
                   hosts: list[ClusterHost] | None = None) -> dict[str, dict[str, Any]]:
    """Until every present host's device has exactly the entries etcd's records call for;
    the records."""
    present = hosts or [h for h in cluster.hosts if not h.removed]
    last: dict[str, Any] = {}

    via = present[0].name if hosts else None

    def converged() -> list[dict[str, dict[str, Any]]]:
        records = etcd_endpoints(cluster, network, via=via)
        for host in present:
            have, want = entries(host, network_id), expected_entries(records, host.name)
            last[host.name] = (have, want)
            if have != want:
                return []
        return [records]
    try:
        return wait_until(converged, timeout=timeout, interval=0.1,
                          what=f"the entries of {network} to converge")[0]
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: (have, want) by host: {last}") from None
