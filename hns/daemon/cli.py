"""hnsctl commands of the userspace data plane: portproxy, netsh, daemon, status."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from hns.errors import InvalidRequest
from hns.output import human_bytes, print_table

__all__ = ["HANDLERS", "register"]

PROG = "hnsctl"


def register(sub: Any, leaf: argparse.ArgumentParser) -> None:
    """Add this package's commands to hnsctl's subparsers."""
    pp = sub.add_parser("portproxy", help="static port proxies, in netsh's words")
    acts = pp.add_subparsers(dest="action", required=True, metavar="ACTION",
                             parser_class=type(leaf))
    for verb, text in (("add", "add a proxy"), ("set", "add or change a proxy"),
                       ("delete", "delete a proxy")):
        p = acts.add_parser(verb, parents=[leaf], help=text)
        p.add_argument("kind", metavar="v4tov4|v4tov6|v6tov4|v6tov6")
        p.add_argument("words", nargs="*", metavar="key=value",
                       help="listenport=N [listenaddress=A] [connectaddress=B] "
                            "[connectport=M] [protocol=tcp|udp] [idletimeout=SECONDS] "
                            "[maxconnections=N]")
    acts.add_parser("show", parents=[leaf], help="show proxies").add_argument(
        "what", nargs="?", default="all", metavar="all|v4tov4|v4tov6|v6tov4|v6tov6")
    acts.add_parser("reset", parents=[leaf], help="delete every proxy")
    sub.add_parser("netsh", parents=[leaf],
                   help="'netsh interface portproxy ...' as pasted from Windows").add_argument(
        "words", nargs=argparse.REMAINDER, action=_NetshWords,
        metavar="interface portproxy add|set|delete|show|reset ...")
    d = sub.add_parser("daemon", parents=[leaf],
                       help="run the port-forwarding daemon in the foreground")
    d.add_argument("--no-heal", action="store_true",
                   help="do not put back what drifted from the state (idle reclaim stays)")
    d.add_argument("--metrics", default=None, metavar="[ADDR:]PORT",
                   help="serve Prometheus metrics at http://ADDR:PORT/metrics in the host "
                        "namespace (ADDR defaults to 127.0.0.1; off unless asked)")
    d.add_argument("--localhost-path", choices=("auto", "relay"), default="auto",
                   help="how localhost forwarding reaches a VM: auto (the kernel where it "
                        "can, else the relay; the default) or relay (always the relay)")
    sub.add_parser("status", parents=[leaf], help="the daemon and its relays")


class _NetshWords(argparse.Action):
    """The words after ``hnsctl netsh``, parsed as netsh reads them: the command becomes
    the ``portproxy`` one it means (``action``, ``kind``, ``words``, ``what``), so the
    state-directory check sees its verb.  ``--json`` among them is hnsctl's."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        from hns.daemon.netsh import parse_netsh
        words = [str(w) for w in values or ()]
        if "-h" in words or "--help" in words:
            parser.print_help()
            parser.exit()
        if "--json" in words:
            namespace.json = True
        command = parse_netsh([w for w in words if w != "--json"])
        namespace.action, namespace.kind = command.verb, command.kind
        namespace.words, namespace.what = list(command.words), command.what


def _config(svc: Any) -> Any:
    from hns.daemon.config import ProxyConfig
    return ProxyConfig(svc.store)


def _poke(svc: Any) -> None:
    """Tell a running daemon to reload at once (it would notice within a second)."""
    from hns.daemon.control import poke
    poke(svc.store.state_dir)


def _local_addresses(svc: Any) -> frozenset[Any]:
    """The addresses of the host namespace (a wildcard proxy listens on each of them)."""
    import ipaddress

    from pyroute2 import IPRoute

    def collect() -> frozenset[Any]:
        with IPRoute() as ipr:
            found = (m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
                     for m in ipr.get_addr())
            return frozenset(ipaddress.ip_address(a.split("%")[0]) for a in found if a)
    return frozenset(svc.kernel.run(collect))


def _show(proxies: Sequence[Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps([p.to_json() for p in proxies], indent=2))
        return
    header = ("TYPE", "PROTOCOL", "LISTEN ADDRESS", "PORT", "CONNECT ADDRESS", "PORT",
              "IDLE TIMEOUT", "MAX CONNECTIONS", "MODE")
    rows = [(p.kind, p.protocol, str(p.listen_address), str(p.listen_port),
             str(p.connect_address), str(p.connect_port),
             f"{p.idle_timeout}s" if p.idle_timeout else "-", str(p.max_connections), p.mode)
            for p in proxies]
    print_table(rows, header)


def _portproxy(svc: Any, args: argparse.Namespace) -> int:
    """``portproxy ...``, and ``netsh interface portproxy ...`` (``show`` in netsh's
    layout)."""
    from hns.daemon.config import forwarded_subnets
    from hns.daemon.netsh import KINDS, kernel_refusal, parse_add, parse_delete, render_show
    config = _config(svc)
    if args.action in ("add", "set"):
        proxy = parse_add(args.kind, args.words)
        refusal = kernel_refusal(proxy, forwarded_subnets(svc.store))
        if proxy.mode == "kernel" and refusal is not None:
            raise InvalidRequest(f"mode=kernel: {refusal}")
        config.add(proxy, replace=args.action == "set", local=_local_addresses(svc))
        from hns.cli_up import daemon_note
        daemon_note(svc, f"the proxy on port {proxy.listen_port}")
    elif args.action == "delete":
        kind, key = parse_delete(args.kind, args.words)
        if not config.delete(kind, key):
            print(f"{PROG}: no {kind} proxy listens on {key.listen_address} port "
                  f"{key.listen_port}/{key.protocol} (nothing to delete)", file=sys.stderr)
    elif args.action == "show":
        what = args.what.lower()
        if what != "all" and what not in KINDS:
            raise InvalidRequest(f"show {args.what!r}: use all, {', '.join(KINDS)}")
        shown = [p for p in config.list() if what in ("all", p.kind)]
        if args.command == "netsh" and not args.json:
            print(render_show(shown), end="")
        else:
            _show(shown, args.json)
        return 0
    elif args.action == "reset":
        config.reset()
    _poke(svc)
    return 0


def _daemon(svc: Any, args: argparse.Namespace) -> int:
    from hns.daemon.daemon import Daemon
    from hns.daemon.metrics import parse_address
    metrics: tuple[str, int] | None
    if args.metrics is not None:
        metrics = parse_address(args.metrics)
    else:                                  # the settings file's [hns] metrics, if any
        from hns.config_apply import read
        setting = read(getattr(args, "config", None)).metrics
        metrics = parse_address(setting) if setting else None
    if getattr(args, "log_level", None) is None:   # a daemon logs what it does
        logging.getLogger().setLevel(logging.DEBUG if args.debug else logging.INFO)
    return Daemon(svc.store, svc.host_netns, config=getattr(args, "config", None),
                  heal=not args.no_heal, metrics=metrics, cluster=svc.overlay.config,
                  localhost_path=args.localhost_path).run()


def _status(svc: Any, args: argparse.Namespace) -> int:
    from hns.daemon.control import relay_status, request
    answer = request(svc.store.state_dir, "status")
    if answer is None:
        answer = {"Running": False, "Relays": [relay_status(p, None, None)
                                               for p in _config(svc).list()]}
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    if answer.get("Running"):
        print(f"daemon: running (pid {answer.get('Pid')})")
    else:
        print("daemon: not running")
    header = ("RELAY", "LISTEN", "CONNECT", "STATE", "CONNECTIONS", "BYTES UP/DOWN")
    rows = [(r["Name"], r["Listen"], r["Connect"], r["State"],
             f"{r['Connections']}/{r['MaxConnections']}" if r.get("MaxConnections")
             else str(r["Connections"]), _moved(r)) for r in answer.get("Relays", [])]
    if rows:
        print_table(rows, header)
    _print_forwards(answer.get("Forwards", []))
    _print_mirrored(answer.get("Mirrored", []))
    _print_dns(answer.get("Dns", []))
    _print_keeper(answer)
    return 0


def _print_keeper(answer: dict[str, Any]) -> None:
    """Healing and idle reclaim in ``hnsctl status``: counts, and the last of each."""
    healing = answer.get("Healing")
    if healing is not None:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(healing["ByKind"].items()))
        state = "on" if healing["Enabled"] else "off"
        print(f"healing: {state}, {healing['Repairs']} repairs" +
              (f" ({kinds})" if kinds else ""))
        if healing["Recent"]:
            last = healing["Recent"][-1]
            print(f"  last: {last['Object']}: {last['Why']}")
        if healing.get("Error"):
            print(f"  error: {healing['Error']}")
    reclaimed = answer.get("Reclaimed") or []
    if reclaimed:
        print(f"reclaimed idle: {', '.join(r['Vm'] for r in reclaimed)}")


def _print_forwards(forwards: Sequence[dict[str, Any]]) -> None:
    """The localhost forwards of ``hnsctl status``: one line per VM port."""
    if not forwards:
        return
    header = ("VM", "PROTOCOL", "LISTEN", "STATE", "CONNECTIONS", "BYTES UP/DOWN")
    rows = [(f["Vm"], f["Protocol"], f["Listen"], f["State"], str(f.get("Connections", 0)),
             _moved(f)) for f in forwards]
    print("localhost forwarding:")
    print_table(rows, header)


def _print_mirrored(entries: Sequence[dict[str, Any]]) -> None:
    """The ports of mirrored VMs in ``hnsctl status``: one line per VM port and direction."""
    if not entries:
        return
    header = ("VM", "PROTOCOL", "PORT", "DIRECTION", "STATE", "CONNECTIONS", "BYTES UP/DOWN")
    rows = [(e["Vm"], f"{e['Protocol']}/{e['Family']}", str(e["Port"]),
             e["Direction"] + (" (and host address)" if e.get("Inbound") else ""), e["State"],
             str(e.get("Connections", 0)), _moved(e)) for e in entries]
    print("mirrored networks:")
    print_table(rows, header)


def _print_dns(entries: Sequence[dict[str, Any]]) -> None:
    """The DNS proxy of ``hnsctl status``: one line per NAT network."""
    if not entries:
        return
    header = ("NETWORK", "LISTEN", "UPSTREAMS", "STATE", "QUERIES", "ANSWERS", "SERVFAIL",
              "FAILURES")
    rows = [(e["Network"], e["Listen"], ",".join(e["Upstreams"]) or "-", e["State"],
             str(e["Queries"]), str(e.get("Answers", 0)), str(e.get("Servfail", 0)),
             str(e["Failures"])) for e in entries]
    print("dns proxy:")
    print_table(rows, header)


def _moved(row: dict[str, Any]) -> str:
    """A relay's bytes each way, as a person reads them: ``1.2M/35K``."""
    return f"{human_bytes(row.get('BytesUp', 0))}/{human_bytes(row.get('BytesDown', 0))}"


HANDLERS: dict[str, Callable[[Any, argparse.Namespace], int]] = {
    "portproxy": _portproxy,
    "netsh": _portproxy,
    "daemon": _daemon,
    "status": _status,
}
