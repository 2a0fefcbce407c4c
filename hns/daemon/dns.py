"""The DNS proxy as a component of the daemon, as WSL's NAT mode has it.

Every NAT network's gateway answers DNS on port 53, UDP and TCP, in the host namespace
(where the daemon runs), by forwarding to the nameservers of the host namespace's
resolv.conf (:func:`hns.resolv.host_resolv_path`), read again whenever it changes.
Because the daemon runs in the host namespace, a loopback nameserver of the host
(systemd-resolved's 127.0.0.53, a local dnsmasq) works as an upstream, which copying
nameservers into the VM cannot do.  The VM's resolv.conf names the gateway first
(:func:`hns.resolv.render_vm_resolv`).

Only the network's own VMs are answered: a query must come from an address of the
network's subnet (not the gateway's own) and arrive on the network's bridge; anything
else gets nothing (:mod:`portproxy._dnsio`).  This holds for mirrored networks too: their
VMs ask the transit gateway from their transit addresses, through the transit bridge.

A gateway whose port 53 cannot be bound (the address or the bridge not there yet,
another server on it) keeps its error, shown by ``hnsctl status``, and is retried every
``retry_interval`` seconds, as the static port proxies are.  The bridge's interface
index is checked as often: a bridge made again (``hnsctl restore``) gets a new one, and
the listener is made again for it.  Messages:
:mod:`portproxy.dnsmsg`; pending queries: :mod:`portproxy.dnsstate`; sockets:
:mod:`portproxy._dnsio`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from hns.daemon.binding import Bound, Retrying
from hns.daemon.counters import dns_counters
from hns.model import Network
from hns.resolv import host_resolv_path
from hns.store import Store
from portproxy._dnsio import DnsServer, Listener, interface_index
from portproxy.dnsstate import Upstream, upstreams_from_resolv
from portproxy.engine import Engine, TimerHandle

__all__ = ["DNS_PORT", "DnsProxy", "HostResolvers"]

log = logging.getLogger("hns.daemon.dns")

DNS_PORT = 53


class HostResolvers:
    """The nameservers of the host namespace's resolv.conf; called per query, it reads the
    file again only when its path, mtime, size or inode changed (one ``stat``)."""

    def __init__(self, host_netns: str | None, port: int = DNS_PORT) -> None:
        self.host_netns = host_netns
        self.port = port
        self.path = ""
        self._signature: tuple[object, ...] | None = None
        self._upstreams: tuple[Upstream, ...] = ()

    def __call__(self) -> tuple[Upstream, ...]:
        path = host_resolv_path(self.host_netns)
        try:
            st = os.stat(path)
            signature: tuple[object, ...] = (path, st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            signature = (path,)
        if signature != self._signature:
            self._signature = signature
            self.path = path
            try:
                with open(path) as f:
                    text = f.read()
            except OSError as exc:
                log.warning("dns: cannot read %s: %s", path, exc)
                text = ""
            self._upstreams = upstreams_from_resolv(text, self.port, limit=16)
            log.info("dns: upstreams from %s: %s", path,
                     " ".join(str(u) for u in self._upstreams) or "none")
        return self._upstreams


def _identity(network: Network) -> tuple[object, ...]:
    """What a listener is made from: a change means a new listener."""
    return network.name, network.gateway, network.subnet, network.bridge


@dataclass
class _Served(Bound):
    network: Network
    listener: Listener | None = None


class DnsProxy:
    """Serves DNS on the gateway of every network of the state (NAT and mirrored)."""

    def __init__(self, engine: Engine, store: Store, host_netns: str | None,
                 retry_interval: float = 2.0, *, port: int = DNS_PORT,
                 resolvers: HostResolvers | None = None) -> None:
        self.engine = engine
        self.store = store
        self.retry_interval = retry_interval
        self.port = port
        self.resolvers = resolvers or HostResolvers(host_netns)
        self.server = DnsServer(engine, self.resolvers)
        self._served: dict[str, _Served] = {}
        self._watch: TimerHandle | None = None

    def reconcile(self) -> None:
        """Listen on the gateway of every NAT network, and only there."""
        desired = {n.id: n for n in self.store.networks()   # NAT and mirrored
                   if n.dns_proxy}
        try:
            self.server.upstreams()     # read (and log) the host's resolv.conf early
        except Exception:
            log.exception("dns: cannot read the upstreams")
        for key, served in list(self._served.items()):
            network = desired.get(key)
            if network is None or _identity(network) != _identity(served.network):
                self._stop(key)
        for key, network in desired.items():
            if key not in self._served:
                self._served[key] = _Served(network)
                self._start(key)
        if self._watch is None:
            self._watch = self.engine.call_later(self.retry_interval, self._check_bridges)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for key in list(self._served):
            self._stop(key)
        self.server.close()

    def _check_bridges(self) -> None:
        """Listen again where a network's bridge was made again (or went away): a
        listener keeps the interface index it was made for."""
        self._watch = self.engine.call_later(self.retry_interval, self._check_bridges)
        for key, served in list(self._served.items()):
            listener = served.listener
            if listener is None or not listener.device:
                continue
            try:
                ifindex = interface_index(listener.device)
            except OSError:
                ifindex = 0
            if ifindex != listener.filter.ifindex:
                log.info("%s: bridge %s changed: listening again", listener.name,
                         listener.device)
                self.server.unlisten(listener)
                served.listener = None
                self._start(key)

    def status(self) -> dict[str, Any]:
        try:
            upstreams = [str(u) for u in self.server.upstreams()]
        except Exception as exc:    # status must answer whatever the file holds
            upstreams = [f"error: {exc}"]
        entries = [self._entry(s, upstreams)
                   for s in sorted(self._served.values(), key=lambda s: s.network.name)]
        return {"Dns": entries,
                "DnsUpstream": {"ResolvConf": self.resolvers.path, "Servers": upstreams,
                                "Pending": len(self.server.forwarding),
                                "Dropped": self.server.forwarding.dropped,
                                "Errors": self.server.errors}}

    def _entry(self, served: _Served, upstreams: list[str]) -> dict[str, Any]:
        listener = served.listener
        if listener is not None:
            state = "listening"
        else:
            state = f"error: {served.error}" if served.error else "inactive"
        return {
            "Network": served.network.name,
            "Listen": f"{served.network.gateway}:{listener.port if listener else self.port}",
            "Upstreams": upstreams,
            "State": state,
            **dns_counters(listener),
        }

    def _start(self, key: str) -> None:
        served = self._served[key]
        if served.binding is not None:
            served.binding.cancel()
        what = f"dns {served.network.name}: cannot listen on {served.network.gateway}:{self.port}"
        served.binding = Retrying(self.engine, what, lambda: self._serve(served),
                                  self.retry_interval)
        served.binding.start()

    def _serve(self, served: _Served) -> None:
        if served.listener is not None:
            return
        network = served.network
        name = f"dns {network.name}"
        served.listener = self.server.listen(name, str(network.gateway), self.port,
                                             device=network.bridge, subnet=network.subnet)
        log.info("%s: listening on %s:%d", name, network.gateway, self.port)

    def _stop(self, key: str) -> None:
        served = self._served.pop(key)
        if served.binding is not None:
            served.binding.cancel()
        if served.listener is not None:
            self.server.unlisten(served.listener)
