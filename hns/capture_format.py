"""What ``hnsctl capture`` prints: a line per packet, the progress and final lines, the
JSON summary.  Pure: frames are dissected by scapy's layers in memory, clocks come in
as values."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, _IPv6ExtHdr
from scapy.layers.l2 import ARP, Ether

from hns.output import human_bytes
from portproxy.addresses import endpoint

__all__ = ["Progress", "Totals", "describe", "final_line", "format_time", "packet_line",
           "progress_text", "summary_json"]

IPPROTO_ICMPV6 = 58
PROGRESS_INTERVAL = 0.25          # seconds between two refreshes of the progress line


@dataclass(frozen=True)
class Totals:
    """What a capture saw: frames, their bytes, seconds it ran, frames the kernel
    dropped because the capture did not read fast enough."""

    packets: int
    nbytes: int
    seconds: float
    dropped: int = 0


def format_time(ts: float) -> str:
    """``HH:MM:SS.ffffff`` in local time, as tcpdump prints it."""
    whole = int(ts)
    micro = round((ts - whole) * 1_000_000)
    if micro >= 1_000_000:
        whole, micro = whole + 1, micro - 1_000_000
    return f"{time.strftime('%H:%M:%S', time.localtime(whole))}.{micro:06d}"


def _arp(arp: Any) -> str:
    if arp.op == 1:
        return f"ARP who-has {arp.pdst} tell {arp.psrc}"
    if arp.op == 2:
        return f"ARP {arp.psrc} is-at {arp.hwsrc}"
    return f"ARP op {arp.op} {arp.psrc} > {arp.pdst}"


def _transport(name: str, src: str, dst: str, l4: Any) -> str:
    text = f"{name} {endpoint(src, l4.sport)} > {endpoint(dst, l4.dport)}"
    if isinstance(l4, TCP):
        text += f" [{l4.flags}]"
    return text


def _icmp(src: str, dst: str, icmp: Any) -> str:
    text = f"ICMP {src} > {dst} {icmp.sprintf('%ICMP.type%')}"
    if icmp.type in (0, 8):
        text += f" id {icmp.id} seq {icmp.seq}"
    elif icmp.type in (3, 5, 11):
        text += f" {icmp.sprintf('%ICMP.code%')}"
    return text


def _ip(layer: Any, name: str) -> str:
    src, dst, header, l4 = str(layer.src), str(layer.dst), layer, layer.payload
    while isinstance(l4, _IPv6ExtHdr):      # hop-by-hop, routing, fragment, ...
        header, l4 = l4, l4.payload
    if name == "IP" and layer.frag:
        return f"IP {src} > {dst} fragment offset {layer.frag * 8}"
    if isinstance(l4, TCP):
        return _transport("TCP", src, dst, l4)
    if isinstance(l4, UDP):
        return _transport("UDP", src, dst, l4)
    if isinstance(l4, ICMP):
        return _icmp(src, dst, l4)
    if name == "IP6" and header.nh == IPPROTO_ICMPV6:
        return f"ICMP6 {src} > {dst} {l4.name.removeprefix('ICMPv6 ')}"
    return f"{name} {src} > {dst} proto {header.proto if name == 'IP' else header.nh}"


def describe(pkt: Any) -> str:
    """A frame in a few words: protocol, source > destination, what it is."""
    if ARP in pkt:
        return _arp(pkt[ARP])
    if IP in pkt:
        return _ip(pkt[IP], "IP")
    if IPv6 in pkt:
        return _ip(pkt[IPv6], "IP6")
    if isinstance(pkt, Ether):
        return f"{pkt.src} > {pkt.dst} ethertype {pkt.type:#06x}"
    return str(pkt.summary())


def packet_line(frame: bytes, ts: float) -> str:
    """One captured Ethernet frame as a line: time, :func:`describe`, its length."""
    try:
        text = describe(Ether(frame))
    except Exception as exc:  # scapy's dissectors are many; a line must still come out
        text = f"undecodable frame ({type(exc).__name__})"
    return f"{format_time(ts)} {text} len {len(frame)}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def progress_text(totals: Totals) -> str:
    """``12 packets, 3.4K bytes, 5.2 s``."""
    return (f"{_plural(totals.packets, 'packet')}, {human_bytes(totals.nbytes)} bytes, "
            f"{totals.seconds:.1f} s")


def final_line(totals: Totals, ifname: str, path: str | None, reason: str) -> str:
    """The line a capture ends with: totals, where, why it stopped."""
    where = f"on {ifname}" + (f" into {path}" if path else "")
    dropped = f", {totals.dropped} dropped by the kernel" if totals.dropped else ""
    return f"captured {progress_text(totals)} {where}{dropped} ({reason})"


def summary_json(totals: Totals, ifname: str, path: str | None) -> dict[str, Any]:
    """The ``--json`` summary."""
    return {"Interface": ifname, "Packets": totals.packets, "Bytes": totals.nbytes,
            "Seconds": round(totals.seconds, 3), "File": path}


class Progress:
    """When to refresh the progress line: at most once per ``interval`` seconds."""

    def __init__(self, interval: float = PROGRESS_INTERVAL) -> None:
        self.interval = interval
        self._next: float | None = None

    def due(self, now: float) -> bool:
        """True (and the next refresh scheduled) when a refresh may be shown at ``now``."""
        if self._next is not None and now < self._next:
            return False
        self._next = now + self.interval
        return True
