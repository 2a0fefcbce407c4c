"""hnsctl's service commands: ``up`` and ``down`` with the daemon (docs/service.md), and
the note that commands whose effect needs the daemon print when none serves."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from hns.service import DEFAULT_STATE_DIR, Service, UpResult

__all__ = ["config_cmd", "daemon_note", "down", "register", "reload_cmd", "up"]

PROG = "hnsctl"


def register(sub: Any, leaf: argparse.ArgumentParser) -> None:
    """Add ``up`` and ``down`` to hnsctl's subparsers."""
    u = sub.add_parser("up", parents=[leaf],
                       help="the WSL network, the VM wsl and the daemon, as WSL's first start")
    u.add_argument("--networking-mode", default=None, metavar="nat|mirrored",
                   help="WSL's networkingMode: the type of the network WSL when it is made "
                        "(default: the settings file's, else nat)")
    u.add_argument("--no-daemon", action="store_true",
                   help="do not start the daemon (localhost forwarding, DNS, proxies)")
    d = sub.add_parser("down", parents=[leaf],
                       help="remove the VM wsl and the network WSL; stop the daemon up started")
    d.add_argument("--keep-daemon", action="store_true", help="leave the daemon running")
    c = sub.add_parser("config", help="the settings file").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=type(leaf))
    c.add_parser("show", parents=[leaf],
                 help="the settings in effect and where each came from")
    sub.add_parser("reload", parents=[leaf],
                   help="apply the settings that can change live; name the others")


def _settings(args: argparse.Namespace, flags: dict[str, Any] | None = None) -> Any:
    """The settings in effect, their notes printed on stderr."""
    from hns.config_apply import read
    found = read(args.config, flags)
    for note in found.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    return found


def config_cmd(svc: Service | None, args: argparse.Namespace) -> int:
    from hns.output import print_table
    from hns.settings import HEADER
    found = _settings(args)
    if args.json:
        print(json.dumps(found.to_json(), indent=2))
    else:
        print_table(found.rows(), HEADER)
    return 0


def reload_cmd(svc: Service, args: argparse.Namespace) -> int:
    from hns.config_apply import reload
    live, restart = reload(svc, _settings(args))
    if args.json:
        print(json.dumps({"Applied": live, "NeedsRestart": restart}, indent=2))
        return 0
    print(f"applied: {', '.join(live)}" if live else "nothing to apply live")
    if restart:
        print(f"{PROG}: note: {', '.join(restart)} changed: they take effect after "
              "'hnsctl down' and 'hnsctl up'", file=sys.stderr)
    return 0


def up_cmd(svc: Service, args: argparse.Namespace) -> int:
    """``up`` with the settings file's values (flags first)."""
    from hns.config_apply import idle_timeout, network_options, record
    from hns.model import NetworkType
    mode = args.networking_mode
    if mode is not None:             # the flag's own message, as network create's --type
        mode = NetworkType.parse(mode).value.lower()
    found = _settings(args, {"networkingMode": mode})
    result = svc.up(found.networking_mode, idle_timeout_ms=idle_timeout(found),
                    network_options=network_options(found))
    record(svc.store.state_dir, found)
    return up(svc, args, result)


def _globals(args: argparse.Namespace) -> str:
    words = [PROG]
    if args.state_dir != DEFAULT_STATE_DIR:
        words.append(f"--state-dir {shlex.quote(args.state_dir)}")
    if args.host_netns:
        words.append(f"--host-netns {shlex.quote(args.host_netns)}")
    return " ".join(words)


def _daemon(svc: Service, args: argparse.Namespace) -> dict[str, Any]:
    if args.no_daemon:
        return {"How": "skipped", "Pid": None}
    from hns.daemon.spawn import start
    started = start(svc.store.state_dir, svc.host_netns, args.config)
    return {"How": started.how, "Pid": started.pid, "Log": started.log}


def up(svc: Service, args: argparse.Namespace, result: UpResult) -> int:
    """Print what ``up`` made, after starting the daemon."""
    daemon = _daemon(svc, args)
    if args.json:
        print(json.dumps({"Network": result.network.to_json(), "Vm": result.vm.to_json(),
                          "Daemon": daemon}, indent=2))
        return 0
    net, vm = result.network, result.vm
    kind = "mirrored, transit" if net.mirrored else "NAT"
    print(f"network {net.name} ({kind}): {net.subnet}, gateway {net.gateway} "
          f"(bridge {net.bridge})")
    print(f"vm {vm.name}: {vm.ip}/{vm.prefixlen} on {vm.interface}, MAC {vm.mac}, "
          f"namespace {vm.netns}")
    how = daemon["How"]
    if how == "skipped":
        print("daemon: not started (--no-daemon): no localhost forwarding, DNS proxy or "
              f"port proxies until '{_globals(args)} daemon' runs")
    elif how == "started":
        print(f"daemon: started (pid {daemon['Pid']}, log {daemon['Log']})")
    else:
        pid = f" (pid {daemon['Pid']})" if daemon["Pid"] else ""
        print(f"daemon: {'started by systemd' if how == 'systemd' else 'running'}{pid}")
    print(f"shell: {_globals(args)} vm exec {vm.name} -- bash   "
          f"(or: ip netns exec {vm.netns} bash)")
    return 0


def down(svc: Service, args: argparse.Namespace) -> int:
    removed = svc.down()
    if not args.keep_daemon:
        from hns.daemon.spawn import stop_spawned
        pid = stop_spawned(svc.store.state_dir)
        if pid is not None:
            removed.append(f"daemon (pid {pid})")
    if args.json:
        print(json.dumps({"Removed": removed}, indent=2))
    elif removed:
        for item in removed:
            print(f"removed {item}")
    else:
        print(f"{PROG}: nothing to remove", file=sys.stderr)
    return 0


def daemon_note(svc: Service, what: str) -> None:
    """Say on stderr that ``what`` waits for a daemon, when none serves the state."""
    from hns.daemon.spawn import serving
    if serving(svc.store.state_dir) is None:
        print(f"{PROG}: note: no daemon serves {svc.store.state_dir}: {what} takes effect "
              f"when one runs ('hnsctl up' or 'hnsctl daemon')", file=sys.stderr)
