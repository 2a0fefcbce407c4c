"""The daemon's control socket, client side, and the shape of its status answers.

Protocol: a Unix stream socket ``<state-dir>/daemon.sock`` (mode 0600); the client sends
one JSON object per line, ``{"command": "status"}`` or ``{"command": "reload"}``, and
reads one JSON object per line back.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from hns.daemon.counters import relay_counters
from hns.daemon.netsh import PortProxy
from portproxy.addresses import endpoint

__all__ = ["CONTROL_SOCKET", "POKE_TIMEOUT", "control_path", "poke", "relay_status", "request"]

CONTROL_SOCKET = "daemon.sock"
POKE_TIMEOUT = 1.0       # s: a poke is best effort (the daemon polls the state anyway)


def control_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / CONTROL_SOCKET


def request(state_dir: str | os.PathLike[str], command: str,
            timeout: float = 5.0) -> dict[str, Any] | None:
    """Send one command to the daemon; its answer, or None when no daemon runs."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(control_path(state_dir)))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        sock.sendall(json.dumps({"command": command}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer


def poke(state_dir: str | os.PathLike[str]) -> None:
    """Tell a running daemon to read the state again now.  Best effort: a daemon also
    notices a change within a second on its own."""
    with contextlib.suppress(OSError, ValueError):
        request(state_dir, "reload", timeout=POKE_TIMEOUT)


def relay_status(proxy: PortProxy, info: Any, error: str | None) -> dict[str, Any]:
    """A static proxy in ``status``: its configuration and, while served, the relay's
    counters (``info``: a RelayInfo or None)."""
    def count(name: str) -> int:
        return int(getattr(info, name)) if info is not None else 0

    return {
        "Name": proxy.name,
        "Kind": "portproxy",
        "Protocol": proxy.protocol,
        "Listen": endpoint(str(proxy.listen_address), proxy.listen_port),
        "Connect": endpoint(str(proxy.connect_address), proxy.connect_port),
        "State": _state(info, error),
        "MaxConnections": info.max_connections if info is not None else proxy.max_connections,
        "IdleTimeout": info.idle_timeout if info is not None else float(proxy.idle_timeout),
        **relay_counters(info),
        "Loops": count("loops"),
    }


def _state(info: Any, error: str | None) -> str:
    if info is None:
        return f"error: {error}" if error else "inactive"
    if info.protocol == "tcp" and 0 < info.max_connections <= info.connections:
        return "full: refusing new connections"
    return "listening"

