"""hnsctl's commands that look inside the network: ``diag`` (a connectivity check that
says where it breaks) and ``capture`` (packets on a VM's or network's host side, as pcap).
The work is in :mod:`hns.diag` and :mod:`hns.capture`; this module only parses."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["HANDLERS", "register"]


def register(sub: Any, leaf: argparse.ArgumentParser) -> None:
    """Add ``diag`` and ``capture`` to hnsctl's subparsers."""
    d = sub.add_parser("diag", parents=[leaf],
                       help="check a VM's network step by step and say where it breaks")
    d.add_argument("vm", metavar="VM")
    d.add_argument("--target", default=None, metavar="ADDR:PORT",
                   help="also check a TCP handshake to this address (default: none)")
    c = sub.add_parser("capture", parents=[leaf],
                       help="capture packets on a VM's host-side veth or a network's bridge")
    c.add_argument("what", metavar="VM|NETWORK")
    c.add_argument("-w", dest="write", default=None, metavar="FILE.pcap",
                   help="write a pcap file (tcpdump and Wireshark read it) instead of a "
                        "line per packet")
    c.add_argument("--count", default=None, metavar="N",
                   help="stop after N packets")
    c.add_argument("--duration", default=None, metavar="S",
                   help="stop after S seconds")
    c.add_argument("filter", nargs="*", metavar="FILTER",
                   help="a BPF filter in tcpdump's words, e.g. tcp port 80")


def _diag(svc: Any, args: argparse.Namespace) -> int:
    from hns.diag import diag_cmd
    return diag_cmd(svc, args)


def _capture(svc: Any, args: argparse.Namespace) -> int:
    from hns.capture import capture_cmd
    return capture_cmd(svc, args)


HANDLERS: dict[str, Any] = {"diag": _diag, "capture": _capture}
