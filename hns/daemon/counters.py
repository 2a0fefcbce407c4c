"""The counters of a relay and of a DNS listener, as ``status`` shows them.

One shape for every kind of relay (static port proxy, localhost forward, mirrored relay),
so ``status --json`` and the metrics read them the same way.  Bytes count what the relay
wrote each way ("up": client to target, "down": back), live connections included; a
relay that is replaced (its VM restarted, its proxy changed) starts again from zero, as
a Prometheus counter may.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DNS_COUNTERS", "RELAY_COUNTERS", "dns_counters", "relay_counters"]

# status key -> RelayInfo attribute
RELAY_COUNTERS: tuple[tuple[str, str], ...] = (
    ("Connections", "connections"),     # live now
    ("Accepted", "accepted"),           # connections (TCP) or flows (UDP) since it started
    ("BytesUp", "bytes_up"),
    ("BytesDown", "bytes_down"),
    ("Refused", "refused"),             # turned away: full, or a loop
    ("Resets", "resets"),               # ended by a reset from either side
    ("TimedOut", "timeouts"),           # the target did not answer the handshake
    ("Unreachable", "unreachable"),     # the target refused or was unreachable
    ("Errors", "errors"),               # every failed connection, the two above included
    ("IdleClosed", "idle_closed"),
)

# status key -> Listener attribute
DNS_COUNTERS: tuple[tuple[str, str], ...] = (
    ("Queries", "queries"),
    ("Answers", "answers"),
    ("Servfail", "servfail"),
    ("Failures", "failures"),
    ("Malformed", "malformed"),
    ("Ignored", "ignored"),
)


def relay_counters(info: Any) -> dict[str, int]:
    """The counters of ``info`` (a RelayInfo, or None for a relay not serving: zeros)."""
    return {key: int(getattr(info, attr)) if info is not None else 0
            for key, attr in RELAY_COUNTERS}


def dns_counters(listener: Any) -> dict[str, Any]:
    """The counters of a DNS listener (None: zeros) and its latency histogram."""
    counts: dict[str, Any] = {key: int(getattr(listener, attr)) if listener is not None else 0
                              for key, attr in DNS_COUNTERS}
    counts["Latency"] = listener.latency.to_json() if listener is not None else None
    return counts
