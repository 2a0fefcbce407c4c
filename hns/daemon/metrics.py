"""The daemon's counters in Prometheus' text format (``hnsctl daemon --metrics ADDR:PORT``).

Theory of operation: the metrics are a view of ``status``.  A scrape asks the engine
thread for a status snapshot (the relays' and DNS listeners' counters live there and are
read nowhere else), then turns it into metric families here, on the HTTP server's
thread.  Nothing is counted for the metrics alone, so serving them costs the relays
nothing between scrapes.  The server is prometheus_client's, bound to the address asked
for (loopback unless told otherwise) in the daemon's namespace, the host's.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from hns.errors import InvalidRequest

__all__ = ["DEFAULT_ADDRESS", "MetricsServer", "StatusCollector", "families",
           "format_address", "parse_address"]

DEFAULT_ADDRESS = "127.0.0.1"

# (metric, help, status key); every relay row has these keys (hns.daemon.counters)
_RELAY_COUNTERS = (
    ("hns_relay_accepted", "Connections (TCP) or flows (UDP) the relay accepted", "Accepted"),
    ("hns_relay_refused", "Connections turned away: the relay full, or a loop", "Refused"),
    ("hns_relay_resets", "Connections ended by a reset from either side", "Resets"),
    ("hns_relay_timeouts", "Connections whose target did not answer the handshake",
     "TimedOut"),
    ("hns_relay_unreachable", "Connections whose target refused or was unreachable",
     "Unreachable"),
    ("hns_relay_errors", "Connections that failed, for any reason", "Errors"),
    ("hns_relay_idle_closed", "Connections closed for being idle", "IdleClosed"),
)
_DNS_COUNTERS = (
    ("hns_dns_queries", "DNS queries from the network's VMs", "Queries"),
    ("hns_dns_answers", "DNS replies sent to the network's VMs", "Answers"),
    ("hns_dns_servfail", "Replies with SERVFAIL, the proxy's own or an upstream's",
     "Servfail"),
    ("hns_dns_failures", "Queries no upstream answered (the proxy said SERVFAIL)",
     "Failures"),
    ("hns_dns_malformed", "Queries refused or dropped as malformed", "Malformed"),
    ("hns_dns_ignored", "Packets from outside the network's VMs, unanswered", "Ignored"),
)
_RELAY_LABELS = ["kind", "relay", "vm", "protocol"]


def parse_address(text: str) -> tuple[str, int]:
    """``PORT``, ``ADDR:PORT`` or ``[ADDR6]:PORT``; a port alone listens on loopback."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = DEFAULT_ADDRESS, text
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:                       # an IPv6 address needs its brackets
        host = ""
    try:
        number = int(port, 10)
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise InvalidRequest(f"--metrics {text!r}: expected PORT, ADDR:PORT or "
                             "[ADDR6]:PORT") from None
    if not 1 <= number <= 65535:
        raise InvalidRequest(f"--metrics {text!r}: port must be 1-65535")
    return address, number


def format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _relay_rows(status: dict[str, Any]) -> Iterator[tuple[list[str], dict[str, Any]]]:
    for row in status.get("Relays", []):
        yield ["portproxy", str(row["Name"]), "", str(row["Protocol"])], row
    for row in status.get("Forwards", []):
        yield ["forward", f"{row['Vm']} {row['Protocol']} {row['Listen']}", str(row["Vm"]),
               str(row["Protocol"])], row
    for row in status.get("Mirrored", []):
        name = f"{row['Vm']} {row['Protocol']}/{row['Family']} {row['Port']} {row['Direction']}"
        yield ["mirrored", name, str(row["Vm"]), str(row["Protocol"])], row


def relay_families(status: dict[str, Any]) -> list[Metric]:
    """Every relay's counters: static proxies, localhost forwards, mirrored relays."""
    active = GaugeMetricFamily("hns_relay_connections",
                               "Connections (TCP) or flows (UDP) the relay holds now",
                               labels=_RELAY_LABELS)
    moved = CounterMetricFamily("hns_relay_bytes", "Bytes the relay wrote each way (up: "
                                "client to target)", labels=[*_RELAY_LABELS, "direction"])
    counters = [(CounterMetricFamily(name, text, labels=_RELAY_LABELS), key)
                for name, text, key in _RELAY_COUNTERS]
    for labels, row in _relay_rows(status):
        active.add_metric(labels, row.get("Connections", 0))
        moved.add_metric([*labels, "up"], row.get("BytesUp", 0))
        moved.add_metric([*labels, "down"], row.get("BytesDown", 0))
        for family, key in counters:
            family.add_metric(labels, row.get(key, 0))
    return [active, moved, *(family for family, _ in counters)]


def dns_families(status: dict[str, Any]) -> list[Metric]:
    """The DNS proxy's counters and latency histogram, per NAT network."""
    counters = [(CounterMetricFamily(name, text, labels=["network"]), key)
                for name, text, key in _DNS_COUNTERS]
    latency = HistogramMetricFamily("hns_dns_latency_seconds", "Time from a query to its "
                                    "reply, seconds", labels=["network"])
    for entry in status.get("Dns", []):
        labels = [str(entry["Network"])]
        for family, key in counters:
            family.add_metric(labels, entry.get(key, 0))
        histogram = entry.get("Latency")
        if histogram:
            buckets = list(histogram["Buckets"].items())
            latency.add_metric(labels, [(bound, count) for bound, count in buckets],
                               histogram["Sum"])
    return [*(family for family, _ in counters), latency]


def portmap_families(status: dict[str, Any]) -> list[Metric]:
    """Packets and bytes of each kernel port mapping (nft counters), both directions."""
    labels = ["protocol", "host_address", "external_port", "target"]
    packets = CounterMetricFamily("hns_portmap_packets", "Packets of the mapping's "
                                  "connections, both directions", labels=labels)
    moved = CounterMetricFamily("hns_portmap_bytes", "Bytes of the mapping's connections, "
                                "both directions", labels=labels)
    for row in status.get("PortMappings", []):
        values = [str(row["Protocol"]), str(row.get("HostAddress") or ""),
                  str(row["ExternalPort"]), str(row["Target"])]
        packets.add_metric(values, row.get("Packets", 0))
        moved.add_metric(values, row.get("Bytes", 0))
    return [packets, moved]


def families(status: dict[str, Any]) -> list[Metric]:
    """The metric families of one status snapshot."""
    up = GaugeMetricFamily("hns_daemon_up", "1 while the daemon answers")
    up.add_metric([], 1 if status.get("Running") else 0)
    out: list[Metric] = [up, *relay_families(status), *dns_families(status),
                         *portmap_families(status)]
    healing = status.get("Healing")
    if healing is not None:
        repairs = CounterMetricFamily("hns_heal_repairs", "Drift the daemon put back, by "
                                      "kind", labels=["kind"])
        for kind, count in sorted(healing.get("ByKind", {}).items()):
            repairs.add_metric([kind], count)
        rounds = CounterMetricFamily("hns_heal_rounds", "Rounds of the keeper")
        rounds.add_metric([], healing.get("Rounds", 0))
        out += [repairs, rounds]
    return out


class StatusCollector(Collector):
    """A collector reading one fresh status snapshot per scrape."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        return families(self.snapshot())


class MetricsServer:
    """prometheus_client's HTTP server for one collector, started and closed with the
    daemon.  Bound in the calling process's namespace."""

    def __init__(self, address: tuple[str, int],
                 snapshot: Callable[[], dict[str, Any]]) -> None:
        self.address = address
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatusCollector(snapshot))
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen; OSError (the port taken, the address not here) for the caller."""
        from prometheus_client import start_http_server
        host, port = self.address
        self._server, self._thread = start_http_server(port, host, self.registry)

    @property
    def port(self) -> int:
        return int(self._server.server_port) if self._server is not None else 0

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
