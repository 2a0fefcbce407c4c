"""Which cluster a host is in, and as whom: from the flags, the environment, the
settings file (in that order).  Pure but for the host-name default."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import IPv4Address

from hns.cluster.etcd import parse_endpoints
from hns.cluster.records import parse_host_name
from hns.errors import InvalidRequest
from hns.model import parse_decimal, parse_ipv4

__all__ = ["DEFAULT_TTL", "MAX_TTL", "MIN_TTL", "ClusterConfig", "cluster_config"]

DEFAULT_TTL = 10           # s: the host lease's TTL
MIN_TTL = 2                # etcd's own floor for a lease
MAX_TTL = 3600


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
