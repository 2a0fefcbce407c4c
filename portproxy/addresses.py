"""Addresses as text: the one ``host:port`` formatter of hns (``[v6]:port``)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

__all__ = ["endpoint"]


def endpoint(host: str | IPv4Address | IPv6Address, port: int) -> str:
    """``host:port``, the host in brackets when it is an IPv6 address."""
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"
