"""``hnsctl cluster status``: the hosts of the cluster and the health of its etcd."""

from __future__ import annotations

import argparse
import json
from typing import Any

from hns.errors import ClusterError
from hns.output import print_table

__all__ = ["HANDLERS", "register"]


def register(sub: Any, leaf: argparse.ArgumentParser) -> None:
    c = sub.add_parser("cluster", help="the cluster of hosts (overlay networks)")
    acts = c.add_subparsers(dest="action", required=True, metavar="ACTION",
                            parser_class=type(leaf))
    acts.add_parser("status", parents=[leaf],
                    help="the hosts (address, VTEP, lease left, VMs) and etcd's health")


def _status(svc: Any, args: argparse.Namespace) -> int:
    found = svc.overlay.state.status()
    if not any(e["Healthy"] for e in found["Endpoints"]):
        raise ClusterError("etcd: no endpoint answered (" + "; ".join(
            f"{e['Url']}: {e['Error']}" for e in found["Endpoints"]) + ")")
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    print(f"this host: {found['Host']}")
    print_table([(h["Name"], h["Address"], h["Vtep"],
                  f"{h['LeaseLeft']}s" if h["LeaseLeft"] >= 0 else "expired", h["Vms"])
                 for h in found["Hosts"]], ("HOST", "ADDRESS", "VTEP", "LEASE LEFT", "VMS"))
    print_table([(e["Url"], "healthy" if e["Healthy"] else f"unhealthy: {e['Error']}")
                 for e in found["Endpoints"]], ("ETCD ENDPOINT", "HEALTH"))
    return 0


def _cluster(svc: Any, args: argparse.Namespace) -> int:
    return _status(svc, args)


HANDLERS: dict[str, Any] = {"cluster": _cluster}
