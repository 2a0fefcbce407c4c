"""Which cluster a host is in, and as whom: from the flags, the environment, the
settings file (in that order).  Pure but for the host-name default."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import IPv4Address
from urllib.parse import urlsplit

from hns.cluster.records import parse_host_name
from hns.errors import InvalidRequest
from hns.model import parse_decimal, parse_ipv4

__all__ = ["DEFAULT_TTL", "MAX_TTL", "MIN_TTL", "ClusterConfig", "cluster_config",
           "parse_endpoints"]

DEFAULT_TTL = 10           # s: the host lease's TTL
MIN_TTL = 2                # etcd's own floor for a lease
MAX_TTL = 3600


def parse_endpoints(text: str) -> tuple[str, ...]:
    """``http://A:2379,http://B:2379`` as a tuple of base URLs (InvalidRequest, exit 2,
    for anything else)."""
    urls = tuple(part.strip() for part in text.split(",") if part.strip())
    if not urls:
        raise InvalidRequest(f"invalid cluster {text!r}: no etcd endpoint named")
    for url in urls:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise InvalidRequest(f"invalid cluster endpoint {url!r}: bad port") from None
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/") \
                or parts.query or parts.fragment:
            raise InvalidRequest(f"invalid cluster endpoint {url!r}: use http://HOST:PORT")
        if port is None:
            raise InvalidRequest(f"invalid cluster endpoint {url!r}: name the port "
                                 "(etcd's is 2379)")
    return tuple(u.rstrip("/") for u in urls)


@dataclass(frozen=True)
class ClusterConfig:
    endpoints: tuple[str, ...]
    host: str                        # this host's name in the cluster
    ttl: int = DEFAULT_TTL
    address: IPv4Address | None = None   # the VTEP; None: found from the route to etcd


def _ttl(text: str) -> int:
    value = parse_decimal(text.strip(), "cluster TTL")
    if not MIN_TTL <= value <= MAX_TTL:
        raise InvalidRequest(f"invalid cluster TTL {text!r}: {MIN_TTL} to {MAX_TTL} seconds")
    return value


def cluster_config(endpoints: str | None, host: str | None, ttl: str | None,
                   address: str | None, host_netns: str | None) -> ClusterConfig | None:
    """The cluster named (None: no cluster; the host keeps to SQLite alone).  ``host``
    defaults to the host namespace's name, else this machine's host name."""
    if endpoints is None or not endpoints.strip():
        return None     # the other values wait for a cluster (an environment may set them)
    name = host if host is not None else (host_netns or socket.gethostname().split(".")[0])
    return ClusterConfig(
        endpoints=parse_endpoints(endpoints), host=parse_host_name(name),
        ttl=_ttl(ttl) if ttl is not None else DEFAULT_TTL,
        address=parse_ipv4(address, "cluster address") if address is not None else None)
