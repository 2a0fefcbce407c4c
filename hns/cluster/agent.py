"""The daemon's cluster agent: this host's lease, and its kernel kept in step with etcd.

Theory of operation
-------------------
Two threads of the agent's own; the event loop never waits for etcd.

- The **watcher** lists the cluster prefix (records + revision R), hands the list to the
  worker, then watches from R + 1 and hands it each event.  When the watch is lost (the
  stream ended, etcd compacted R away, or no endpoint answers) it lists again after a
  pause: a full resync, never an error.
- The **worker** owns the view (:class:`~hns.cluster.view.ClusterView`), a service of
  its own and the session.  The session is the host's lease: the one the state
  directory remembers while etcd still has it, else a new one; the host record is put
  under it and kept alive every TTL/3.  A lease etcd no longer has starts a new session,
  and this host's endpoint records are put again from the local store, which is the
  truth for which VMs live here.  After a list, an event or a change of the local state
  the worker programs every overlay network: made on this host if only etcd had it,
  and its VXLAN device given exactly the other hosts' entries (a diff against what the
  kernel has).  While etcd is out of reach the kernel keeps what it has.

Stopping the daemon does not revoke the lease: a restart within the TTL finds it, and
the other hosts' entries stay; a host that does not come back is removed by etcd when
the lease runs out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from hns.cluster.config import ClusterConfig
from hns.cluster.etcd import ClusterError, Etcd, WatchLost
from hns.cluster.records import (
    PREFIX,
    EndpointRecord,
    HostRecord,
    endpoint_key,
    host_key,
)
from hns.cluster.view import ClusterView, diff, entries_for
from hns.errors import HnsError

__all__ = ["LEASE_META", "ClusterAgent"]

log = logging.getLogger("hns.daemon")

LEASE_META = "cluster_lease"      # the lease this host's daemon last held
RETRY = 0.5                       # s between two tries to reach etcd (list, session)
SETTLE = 0.02                     # s: events that come together are programmed once
STALE_AFTER = 30.0                # s a record of this host without a VM waits before it
                                  # goes: a create writes etcd before its local row

Job = tuple[str, Any]


def request_timeout(ttl: int) -> float:
    """The agent's per-endpoint timeout: a silent member must not hold a keepalive past
    the lease (a quarter of the TTL, 0.5 s to 3 s)."""
    return max(0.5, min(3.0, ttl / 4))


class ClusterAgent:
    """A daemon component: ``reconcile`` (the local state changed), ``status``, ``close``."""

    def __init__(self, state_dir: str, host_netns: str | None, config: ClusterConfig) -> None:
        self.state_dir = state_dir
        self.host_netns = host_netns
        self.config = config
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._cancel: Callable[[], None] | None = None
        self._watch_url: str | None = None       # the endpoint the watch stream reads
        self._info: dict[str, Any] = {"Host": config.host, "Lease": 0, "Revision": 0,
                                      "Watching": False, "Networks": {}, "Error": None,
                                      "Resyncs": 0, "Sessions": 0}
        self._threads = [threading.Thread(target=self._work, name="hns-cluster", daemon=True),
                         threading.Thread(target=self._watch, name="hns-cluster-watch",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()

    # component

    def reconcile(self) -> None:
        self._jobs.put(("local", None))

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"Cluster": json.loads(json.dumps(self._info))}

    def close(self) -> None:
        self._stop.set()
        self._jobs.put(("stop", None))
        with self._lock:
            cancel = self._cancel
        if cancel is not None:
            with contextlib.suppress(Exception):
                cancel()
        for thread in self._threads:     # a request in flight ends within its timeout
            thread.join(1)

    def _note(self, **changes: Any) -> None:
        with self._lock:
            self._info.update(changes)

    # the watcher's thread

    def _watch(self) -> None:
        etcd = Etcd(self.config.endpoints, request_timeout(self.config.ttl))
        self._watch_etcd = etcd
        try:
            while not self._stop.is_set():
                try:
                    kvs, revision = etcd.get_prefix(PREFIX)
                except ClusterError as exc:
                    self._note(Watching=False, Error=str(exc))
                    self._stop.wait(RETRY)
                    continue
                self._jobs.put(("listed", (kvs, revision)))
                try:
                    for event in etcd.watch(PREFIX, revision + 1, self._watching):
                        self._jobs.put(("event", event))
                except WatchLost as exc:
                    if not self._stop.is_set():
                        log.info("cluster: watch lost (%s): listing again", exc)
                        self._note(Watching=False)
                        self._stop.wait(RETRY if not exc.compacted else 0)
        finally:
            etcd.close()

    def _watching(self, cancel: Callable[[], None]) -> None:
        with self._lock:
            self._cancel = cancel
            self._watch_url = self._watch_etcd.endpoint
        self._note(Watching=True)

    def check_watch(self, answering: str) -> None:
        """The worker reached etcd through ``answering``: a watch on another endpoint may
        be on a member that went silent (a host cut off sends no FIN, so its stream
        never ends): end it, the watcher lists again through one that answers."""
        with self._lock:
            cancel = self._cancel if self._watch_url not in (None, answering) else None
            if cancel is not None:
                self._cancel, self._watch_url = None, None
        if cancel is not None:
            log.info("cluster: etcd answers at %s, not at the watched endpoint: watching "
                     "again", answering)
            with contextlib.suppress(Exception):
                cancel()

    # the worker's thread

    def _work(self) -> None:
        from hns.service import Service
        try:
            svc = Service(self.state_dir, self.host_netns, cluster=self.config)
        except HnsError as exc:
            log.error("cluster: cannot open the state: %s", exc)
            return
        worker = _Worker(svc, self.config, self._note, self.check_watch)
        try:
            while not self._stop.is_set():
                try:
                    job = self._jobs.get(timeout=worker.next_keepalive())
                except queue.Empty:
                    worker.keepalive()
                    continue
                jobs = [job, *self._drain()]
                if any(kind == "stop" for kind, _ in jobs):
                    break
                worker.handle(jobs)
        finally:
            svc.close()

    def _drain(self) -> list[Job]:
        time.sleep(SETTLE)
        found = []
        with contextlib.suppress(queue.Empty):
            while True:
                found.append(self._jobs.get_nowait())
        return found


class _Worker:
    """The worker thread's state: the session, the view and what it programs."""

    def __init__(self, svc: Any, config: ClusterConfig, note: Callable[..., None],
                 check_watch: Callable[[str], None]) -> None:
        self.svc = svc
        self.config = config
        self.note = note
        self.check_watch = check_watch
        self.etcd = Etcd(config.endpoints, request_timeout(config.ttl))
        self.view: ClusterView | None = None
        self.lease = 0
        self.renewed = 0.0
        self.sessions = 0
        self.resyncs = 0
        self.put_missing = False        # this host's records to be put again (new lease)
        self.suspects: dict[tuple[str, Any], float] = {}   # record -> when first seen stale
        self.gone_networks: dict[str, float] = {}          # name -> when first seen gone
        self.session()

    # the session (the host's lease)

    def next_keepalive(self) -> float:
        if not self.lease:
            return RETRY
        return max(0.05, self.renewed + self.config.ttl / 3 - time.monotonic())

    def session(self) -> None:
        """Hold a lease with the host record under it (reuse the remembered one)."""
        try:
            address, _ = self.svc.overlay.underlay()
            remembered = int(self.svc.store.meta(LEASE_META) or 0)
            lease = remembered if remembered and self.etcd.time_to_live(remembered) > 0 \
                else self.etcd.grant(self.config.ttl)
            holder = self.etcd.get(host_key(self.config.host))
            if holder is not None and holder.lease not in (0, lease) and \
                    self.etcd.time_to_live(holder.lease) > 0:
                raise ClusterError(f"host name {self.config.host!r} is held by another "
                                   "host's lease")
            record = HostRecord(self.config.host, address, self.config.ttl)
            self.etcd.put(host_key(self.config.host), json.dumps(record.to_json()), lease)
        except HnsError as exc:
            self.lease = 0
            self.note(Lease=0, Error=str(exc))
            log.warning("cluster: no session: %s", exc)
            return
        self.svc.overlay.remember()
        if lease != remembered:
            self.svc.store.set_meta(LEASE_META, str(lease))
            log.info("cluster: host %s joined with lease %x", self.config.host, lease)
        self.lease, self.renewed = lease, time.monotonic()
        self.sessions += 1
        self.note(Lease=lease, Error=None, Sessions=self.sessions)
        # a new lease: etcd dropped the records of the old one; put them back (once a
        # view is there).  Only then: a record missing under a live lease was deleted
        # on purpose (a vm delete writes etcd before its local row goes)
        self.put_missing = True
        self.own_endpoints()

    def keepalive(self) -> None:
        if not self.lease:
            self.session()
            return
        try:
            ttl = self.etcd.keepalive(self.lease)
        except ClusterError as exc:
            self.note(Error=str(exc))
            self.renewed = time.monotonic() - self.config.ttl / 3 + RETRY
            return
        if ttl <= 0:
            log.warning("cluster: lease %x expired: joining again", self.lease)
            self.lease = 0
            self.session()
            return
        self.renewed = time.monotonic()
        self.note(Error=None)
        self.check_watch(self.etcd.endpoint)
        if self.suspects:          # stale records of this host wait out their grace here
            self.own_endpoints()
        if self.gone_networks and self.view is not None:
            self._forget_deleted()

    # jobs

    def handle(self, jobs: list[Job]) -> None:
        for kind, value in jobs:
            if kind == "listed":
                kvs, revision = value
                self.view = ClusterView.listed(kvs, revision)
                self.resyncs += 1
                self.note(Resyncs=self.resyncs)
            elif kind == "event" and self.view is not None:
                self.view.apply(value)
        if self.view is None:
            return
        self.note(Revision=self.view.revision)
        if any(kind in ("listed", "local") for kind, _ in jobs):
            self.own_endpoints()
        self.program()

    def own_endpoints(self) -> None:
        """This host's endpoint records match its overlay VMs: after a new session the
        missing are put again (under the lease); the stale are deleted after a grace."""
        if self.view is None or not self.lease:
            return
        try:
            self._own_endpoints(self.view, self.put_missing)
            self.put_missing = False
        except HnsError as exc:
            self.note(Error=str(exc))
            log.warning("cluster: endpoint resync: %s", exc)

    def _own_endpoints(self, view: ClusterView, put_missing: bool) -> None:
        from hns.store import ANY_STATE
        store = self.svc.store
        overlay = {n.id: n for n in store.networks(ANY_STATE) if n.overlay}
        local = {(vm.network, vm.ip): vm for vm in store.vms() if vm.network_id in overlay}
        known = {vm.id for vm in store.vms(states=ANY_STATE)}
        mine = {(e.network, e.ip): e for e in view.endpoints() if e.host == self.config.host}
        address, _ = self.svc.overlay.underlay()
        for (network, ip), vm in local.items():
            if not put_missing or ((network, ip) in mine and mine[(network, ip)].id == vm.id):
                continue
            record = EndpointRecord(vm.id, vm.name, network, ip, vm.mac, self.config.host,
                                    address)
            key = endpoint_key(network, ip)
            ok, _ = self.etcd.txn([self.etcd.absent(key)],
                                  [self.etcd.put_op(key, json.dumps(record.to_json()),
                                                    self.lease)])
            if not ok and (network, ip) not in mine:
                log.error("cluster: vm %s: address %s of %s is held by another host",
                          vm.name, ip, network)
        now = time.monotonic()
        stale = {where for where, record in mine.items() if record.id not in known}
        self.suspects = {where: self.suspects.get(where, now) for where in stale}
        for where, since in list(self.suspects.items()):
            if now - since >= STALE_AFTER:
                log.info("cluster: endpoint %s %s has no VM on this host: deleted", *where)
                self.svc.overlay.state.release(where[0], where[1], mine[where].id)
                del self.suspects[where]

    def program(self) -> None:
        """Every overlay network of the view made here, its device's entries exact."""
        from hns.cluster.vxlan import apply_plan, read_entries
        assert self.view is not None
        counts: dict[str, int] = {}
        for name, record in sorted(self.view.networks().items()):
            try:
                net = self.svc.overlay.adopt(record)
                device = _device(self.svc, net)
                have = self.svc.kernel.run(read_entries, device)
                if have is None:
                    self.svc.ensure_bridge(net)
                    have = self.svc.kernel.run(read_entries, device)
                want = entries_for(self.view, name, self.config.host)
                self.svc.kernel.run(apply_plan, device, diff(have, want))
                counts[name] = want.count
            except HnsError as exc:
                log.warning("cluster: network %s: %s", name, exc)
                self.note(Error=f"network {name}: {exc}")
        self._forget_deleted()
        self.note(Networks=counts)

    def _forget_deleted(self) -> None:
        """Overlay networks etcd no longer has go from this host (when no VM is on them)."""
        assert self.view is not None
        listed, now = self.view.networks(), time.monotonic()
        gone = {n.name for n in self.svc.store.networks() if n.overlay and n.name not in listed}
        # a network this host just made may be newer than the view: wait before trusting
        self.gone_networks = {name: self.gone_networks.get(name, now) for name in gone}
        for name, since in list(self.gone_networks.items()):
            net = self.svc.store.find_network(name)
            if now - since < STALE_AFTER or net is None or self.svc.store.vms(net.id):
                continue
            with contextlib.suppress(HnsError):
                self.svc.delete_network(name)
                log.info("cluster: network %s was deleted in the cluster", name)
            del self.gone_networks[name]


def _device(svc: Any, net: Any) -> str:
    from hns import naming
    return naming.vxlan_name(svc.instance, net.id)
