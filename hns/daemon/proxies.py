"""The static port proxies as a component of the daemon.

Each configured proxy gets a listening socket handed to the relay engine, with its idle
timeout and connection cap.  A proxy whose socket cannot be opened (address in use, an
address not yet on the host) keeps its error, shown by ``hnsctl status``, and is retried
every ``retry_interval`` seconds.  A proxy changed in any way (``set``) is served anew:
its listener is closed and its live connections reset.

The kernel path (docs/datapath.md): a proxy the kernel can serve (``kernel_refusal``)
whose mode is not ``relay`` is also translated by the daemon's fast table once its
listener is bound, so connections arriving at a non-loopback host address are DNATed to
the VM, which sees the client's address; the relay keeps serving host loopback.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from hns.daemon.binding import Bound, Retrying
from hns.daemon.config import ProxyConfig, forwarded_subnets
from hns.daemon.control import relay_status
from hns.daemon.fastpath import FastPath
from hns.daemon.netsh import PortProxy, ProxyKey, kernel_refusal
from hns.store import Store
from nat.fastpath import FastEntry
from portproxy.engine import Engine
from portproxy.sockets import listen

__all__ = ["StaticProxies"]

log = logging.getLogger("hns.daemon")


@dataclass
class _Served(Bound):
    proxy: PortProxy
    relay: Any = None
    kernel: bool = False       # translated by the fast table too


class StaticProxies:
    """Serves what ``hnsctl portproxy`` configured."""

    def __init__(self, engine: Engine, store: Store, retry_interval: float = 2.0, *,
                 fast: FastPath | None = None) -> None:
        self.engine = engine
        self.store = store
        self.fast = fast
        self._subnets: list[IPv4Network] = []
        self.config = ProxyConfig(store)
        self.retry_interval = retry_interval
        self._served: dict[ProxyKey, _Served] = {}

    def reconcile(self) -> None:
        """Make the served proxies what the state says."""
        desired = {p.key: p for p in self.config.list()}
        self._subnets = forwarded_subnets(self.store)
        for key, served in list(self._served.items()):
            if desired.get(key) != served.proxy:
                self._stop(key)
        for key, proxy in desired.items():
            if key not in self._served:
                self._served[key] = _Served(proxy)
                self._start(key)
        for served in self._served.values():
            self._sync_path(served)

    def _sync_path(self, served: _Served) -> None:
        """Translate the proxy in the kernel when it can and its listener is bound."""
        proxy = served.proxy
        want = (self.fast is not None and served.relay is not None and proxy.mode != "relay"
                and kernel_refusal(proxy, self._subnets) is None)
        if want == served.kernel or self.fast is None:
            return
        if not want:
            self.fast.remove(("proxy", proxy.key))
            served.kernel = False
            return
        assert isinstance(proxy.connect_address, IPv4Address)
        address = proxy.listen_address
        entry = FastEntry(proxy.protocol, proxy.listen_port, proxy.connect_address,
                          proxy.connect_port,
                          None if address.is_unspecified else IPv4Address(address))
        served.kernel = self.fast.add(("proxy", proxy.key), entry)
        if served.kernel:
            log.info("%s: through the kernel", proxy.name)

    def close(self) -> None:
        for key in list(self._served):
            self._stop(key)

    def status(self) -> dict[str, Any]:
        infos = {info.name: info for info in self.engine.relays()}
        relays = [{**relay_status(s.proxy, infos.get(s.proxy.name), s.error),
                   "Path": "kernel" if s.kernel else "relay"}
                  for s in sorted(self._served.values(), key=lambda s: s.proxy.key)]
        return {"Relays": relays}

    def _start(self, key: ProxyKey) -> None:
        served = self._served[key]
        served.binding = Retrying(self.engine, f"{served.proxy.name}: cannot listen",
                                  lambda: self._serve(served), self.retry_interval)
        served.binding.start()

    def _serve(self, served: _Served) -> None:
        """Bind the proxy's socket and hand it to the engine (OSError: not now)."""
        if served.relay is not None:
            return
        proxy = served.proxy
        family = socket.AF_INET if proxy.listen_family == 4 else socket.AF_INET6
        kind = socket.SOCK_STREAM if proxy.protocol == "tcp" else socket.SOCK_DGRAM
        sock = listen(family, kind, str(proxy.listen_address), proxy.listen_port)
        target = (str(proxy.connect_address), proxy.connect_port)
        try:
            if proxy.protocol == "tcp":
                served.relay = self.engine.add_tcp(sock, target, name=proxy.name,
                                                   idle_timeout=float(proxy.idle_timeout),
                                                   max_connections=proxy.max_connections)
            else:   # flows always expire: 0 keeps the engine's timeout
                served.relay = self.engine.add_udp(sock, target, name=proxy.name,
                                                   idle_timeout=proxy.idle_timeout or None,
                                                   max_flows=proxy.max_connections)
        except BaseException:
            sock.close()
            raise
        log.info("%s -> %s:%d", proxy.name, *target)
        self._sync_path(served)

    def _stop(self, key: ProxyKey) -> None:
        served = self._served.pop(key)
        if served.kernel and self.fast is not None:
            self.fast.remove(("proxy", key))
        if served.binding is not None:
            served.binding.cancel()
        if served.relay is not None:
            self.engine.remove(served.relay)
