# PYTHON_ARGCOMPLETE_OK
"""``hnsctl``: the command line of hns.

Exit codes: 0 success, 1 runtime failure (nothing half-made is left), 2 invalid input
(nothing changed).  Errors are one line on stderr; ``--debug`` adds the traceback.  A
closed stdout (output piped to ``head``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from hns.errors import HnsError, InvalidRequest, KernelError
from hns.logfmt import configure_logging, line_prefix
from hns.model import (
    HostPort,
    Network,
    Vm,
    format_port_list,
    parse_name,
    parse_netns_name,
    parse_on_off,
)
from hns.netns import netns_exists, netns_mounted
from hns.output import print_table, silence_stdout, stdout_closed
from hns.process import exec_in_netns
from hns.service import DEFAULT_STATE_DIR, Service

__all__ = ["main"]

PROG = "hnsctl"


def _printable(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (an error echoes
    user input, which may hold anything)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _one_line(text: str) -> str:
    """``text`` (a kernel's or nft's message may have several lines) as one line."""
    return _printable("; ".join(line.strip() for line in text.splitlines() if line.strip()))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        if sys.stderr is not None:  # None: stderr was closed
            sys.stderr.write(f"{PROG}: error: {_printable(message)} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("hns-wsl-emulator")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _completion(parser: argparse.ArgumentParser) -> None:
    """Bash completion (argcomplete): answers and exits only when the shell asks."""
    if "_ARGCOMPLETE" in os.environ:
        import argcomplete
        argcomplete.autocomplete(parser)


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="WSL-style host networking for Linux namespaces.")
    p.add_argument("--state-dir", default=os.environ.get("HNS_STATE_DIR") or None,
                   help="state directory (env HNS_STATE_DIR, else the settings file's "
                        f"stateDir, else {DEFAULT_STATE_DIR})")
    p.add_argument("--host-netns", default=os.environ.get("HNS_HOST_NETNS") or None,
                   help="namespace that plays the host (env HNS_HOST_NETNS, else the "
                        "settings file's hostNetns, default: this one)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="settings file, .wslconfig's words (env HNS_CONFIG, default "
                        "/etc/hns/wslconfig)")
    p.add_argument("--cluster", default=os.environ.get("HNS_CLUSTER") or None,
                   metavar="URL,...", help="etcd endpoints of the cluster this host is in, "
                   "for overlay networks (env HNS_CLUSTER, else the settings file's cluster)")
    p.add_argument("--host-name", default=os.environ.get("HNS_HOST_NAME") or None,
                   help="this host's name in the cluster (env HNS_HOST_NAME; default: the "
                        "host namespace's name, else the machine's)")
    p.add_argument("--cluster-ttl", default=os.environ.get("HNS_CLUSTER_TTL") or None,
                   metavar="SECONDS", help="the host lease's TTL (env HNS_CLUSTER_TTL, "
                                           "default 10)")
    p.add_argument("--cluster-address", default=os.environ.get("HNS_CLUSTER_ADDRESS") or None,
                   metavar="ADDR", help="this host's underlay address, its VTEP (env "
                   "HNS_CLUSTER_ADDRESS; default: the source address towards etcd)")
    p.add_argument("--json", action="store_true", help="print JSON")
    leaf = _Parser(add_help=False)
    leaf.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                      help="print JSON")
    p.add_argument("--debug", action="store_true", help="print tracebacks")
    p.add_argument("--log-level", default=os.environ.get("HNS_LOG_LEVEL") or None,
                   metavar="error|warning|info|debug",
                   help="log this level and above (env HNS_LOG_LEVEL; default warning, "
                        "debug with --debug, info for the daemon)")
    p.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=_Parser)

    _add_network_parser(sub, leaf)
    _add_vm_parser(sub, leaf)
    _add_portmap_parser(sub, leaf)
    from hns import cli_up
    cli_up.register(sub, leaf)
    sub.add_parser("restore", parents=[leaf], help="recreate kernel objects from the state")
    gc = sub.add_parser("gc", parents=[leaf], help="remove leftover kernel objects")
    gc.add_argument("--dry-run", action="store_true", help="only list them")
    gc.add_argument("--sandboxes", action="store_true",
                    help="instead: remove test sandboxes whose owning process is gone")
    from hns.daemon.cli import register
    register(sub, leaf)
    from hns import cli_observe
    cli_observe.register(sub, leaf)
    from hns import cli_cluster
    cli_cluster.register(sub, leaf)
    return p


def _add_network_parser(sub: Any, leaf: argparse.ArgumentParser) -> None:
    net = sub.add_parser("network", help="NAT networks").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    c = net.add_parser("create", parents=[leaf], help="create a network")
    c.add_argument("name")
    c.add_argument("--type", required=True,
                   help="nat (own subnet), mirrored (the VMs share the host's addresses) or "
                        "overlay (one subnet across the hosts of a cluster)")
    c.add_argument("--subnet", help="NAT: IPv4 CIDR (default: a free /20 in 172.16.0.0/12)")
    c.add_argument("--gateway", help="NAT: gateway address (default: the first of the subnet)")
    c.add_argument("--mtu", help="MTU (default 1500; overlay: the underlay's less 50)")
    c.add_argument("--vni", help="overlay: the VXLAN network identifier (default: the "
                                 "lowest free from 4096)")
    c.add_argument("--localhost-forwarding", default="on", metavar="on|off",
                   help="NAT: serve ports the VMs listen on at host localhost (default on)")
    c.add_argument("--firewall", default="on", metavar="on|off",
                   help="NAT: forward nothing unsolicited into the VMs: only port mappings, "
                        "replies and the network's own traffic (WSL's firewall, default on)")
    c.add_argument("--dns-proxy", default="on", metavar="on|off",
                   help="the daemon's DNS proxy on the gateway is the VMs' nameserver "
                        "(WSL's dnsProxy, default on; off: the host's resolvers)")
    c.add_argument("--ignored-ports", metavar="LIST",
                   help="mirrored: ports never forwarded, e.g. 22,8000-8010")
    c.add_argument("--host-address-loopback", metavar="on|off",
                   help="mirrored: the host reaches a VM's ports at its own address too "
                        "(default off)")
    net.add_parser("list", parents=[leaf], help="list networks")
    net.add_parser("show", parents=[leaf], help="show a network").add_argument("name")
    d = net.add_parser("delete", parents=[leaf], help="delete a network")
    d.add_argument("name")
    d.add_argument("--force", action="store_true", help="also delete attached VMs")


def _add_vm_parser(sub: Any, leaf: argparse.ArgumentParser) -> None:
    vm = sub.add_parser("vm", help="VM namespaces").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    c = vm.add_parser("create", parents=[leaf], help="create a VM namespace on a network")
    c.add_argument("name")
    c.add_argument("--network", required=True)
    c.add_argument("--ip", help="address (default: the lowest free)")
    c.add_argument("--mac", help="MAC (default: random in 00:15:5d)")
    c.add_argument("--idle-timeout", metavar="MS",
                   help="stop the VM after this long idle (ms; default -1: never)")
    vm.add_parser("list", parents=[leaf], help="list VMs").add_argument("--network")
    vm.add_parser("stop", parents=[leaf],
                  help="power a VM off (kept: address, MAC, mappings)").add_argument("name")
    vm.add_parser("start", parents=[leaf], help="power a stopped VM on").add_argument("name")
    vm.add_parser("show", parents=[leaf], help="show a VM").add_argument("name")
    vm.add_parser("delete", parents=[leaf], help="delete a VM").add_argument("name")
    e = vm.add_parser("exec", parents=[leaf],
                      help="run a command in a VM: vm exec NAME -- CMD [ARG...]")
    e.add_argument("name")
    e.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")


def _add_portmap_parser(sub: Any, leaf: argparse.ArgumentParser) -> None:
    pm = sub.add_parser("portmap", help="kernel port mappings (HNS PortMapping)").add_subparsers(
        dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    for action, text in (("add", "forward a host port to a VM"),
                         ("delete", "remove a port mapping")):
        a = pm.add_parser(action, parents=[leaf], help=text)
        a.add_argument("vm")
        a.add_argument("--protocol", required=True, help="tcp or udp")
        a.add_argument("--external-port", required=True, help="the host port")
        if action == "add":
            a.add_argument("--internal-port", required=True, help="the VM's port")
        a.add_argument("--host-address", help="one host IPv4 address (default: every one)")
    pm.add_parser("list", parents=[leaf], help="list port mappings").add_argument(
        "vm", nargs="?")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _vm_state(vm: Vm) -> str:
    """Running, Stopped, or Missing: running in the state, its namespace gone."""
    return "Missing" if vm.running and not netns_exists(vm.netns) else \
        vm.power.value.capitalize()


def _show(obj: Network | Vm, as_json: bool) -> None:
    data = obj.to_json()
    if isinstance(obj, Vm):
        data["State"] = _vm_state(obj)
    if as_json:
        _print_json(data)
        return
    width = max(len(key) for key in data) + 2
    for key, value in data.items():
        if isinstance(value, list) and (key == "IgnoredPorts" or value) and all(
                isinstance(v, int | str) for v in value):
            value = (",".join(str(v) for v in value) if key != "IgnoredPorts" else
                     format_port_list(tuple(int(v) for v in value))) or "none"
        if not isinstance(value, list | dict):
            print(f"{key + ':':<{width}}{value}")


def _network_cmd(svc: Service, args: argparse.Namespace) -> int:
    if args.action == "create":
        forwarding = parse_on_off(args.localhost_forwarding, "--localhost-forwarding")
        loopback = (parse_on_off(args.host_address_loopback, "--host-address-loopback")
                    if args.host_address_loopback is not None else None)
        firewall = parse_on_off(args.firewall, "--firewall")
        dns = parse_on_off(args.dns_proxy, "--dns-proxy")
        net = svc.create_network(args.name, args.type, args.subnet, args.gateway, args.mtu,
                                 forwarding, args.ignored_ports, loopback, firewall, dns,
                                 args.vni)
        _show(net, args.json)
        if net.localhost_forwarding or net.mirrored:
            from hns.cli_up import daemon_note
            what = "mirroring" if net.mirrored else "localhost forwarding"
            daemon_note(svc, f"{what} on network {net.name}")
    elif args.action == "list":
        nets = svc.list_networks()
        if args.json:
            _print_json([n.to_json() for n in nets])
        else:
            print_table([(n.name, n.type.value, n.subnet, n.gateway, n.mtu, n.bridge)
                         for n in nets], ("NAME", "TYPE", "SUBNET", "GATEWAY", "MTU", "BRIDGE"))
    elif args.action == "show":
        _show(svc.get_network(args.name), args.json)
    elif args.action == "delete" and not svc.delete_network(args.name, args.force):
        print(f"{PROG}: network {args.name!r} does not exist (nothing to delete)",
              file=sys.stderr)
    return 0


def _vm_cmd(svc: Service, args: argparse.Namespace) -> int:
    if args.action == "create":
        vm = svc.create_vm(args.name, args.network, args.ip, args.mac, args.idle_timeout)
        _show(vm, args.json)
        net = svc.get_network(vm.network)
        if net.localhost_forwarding or net.mirrored:
            from hns.cli_up import daemon_note
            daemon_note(svc, f"localhost forwarding for vm {vm.name}")
    elif args.action == "list":
        vms = svc.list_vms(None if args.network is None else
                           parse_name(args.network, "network name"))
        if args.json:
            _print_json([{**v.to_json(), "State": _vm_state(v)} for v in vms])
        else:
            print_table([(v.name, v.network, _vm_state(v), f"{v.ip}/{v.prefixlen}", v.mac,
                          v.netns) for v in vms],
                        ("NAME", "NETWORK", "STATE", "ADDRESS", "MAC", "NETNS"))
    elif args.action == "show":
        _show(svc.get_vm(args.name), args.json)
    elif args.action in ("stop", "start"):
        changed = (svc.stop_vm if args.action == "stop" else svc.start_vm)(args.name)
        if not changed:
            print(f"{PROG}: vm {args.name!r} is already "
                  f"{'stopped' if args.action == 'stop' else 'running'}", file=sys.stderr)
    elif args.action == "delete":
        if not svc.delete_vm(args.name):
            print(f"{PROG}: vm {args.name!r} does not exist (nothing to delete)",
                  file=sys.stderr)
    elif args.action == "exec":
        return _vm_exec(svc, args)
    return 0


def _vm_exec(svc: Service, args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise _Usage("vm exec needs a command: hnsctl vm exec NAME -- CMD [ARG...]")
    vm = svc.get_vm(args.name)
    if not vm.running:               # as wsl.exe starts the utility VM
        svc.start_vm(vm.name)
    if not netns_exists(vm.netns):
        raise KernelError(f"the namespace of vm {vm.name} is gone; run 'hnsctl restore'")
    svc.close()
    if sys.stdout is not None:
        sys.stdout.flush()
    exec_in_netns(vm.netns, argv)
    return 127  # not reached


def _portmap_cmd(svc: Service, args: argparse.Namespace) -> int:
    if args.action == "add":
        m = svc.add_port_mapping(args.vm, args.protocol, args.external_port,
                                 args.internal_port, args.host_address)
        if args.json:
            _print_json(m.to_json())
        else:
            print(f"mapped {m.describe()}")
    elif args.action == "list":
        maps = svc.list_port_mappings(args.vm)
        if args.json:
            _print_json([m.to_json() for m in maps])
        else:
            print_table([(m.vm, m.protocol.keyword, m.host_address or "*", m.external_port,
                          m.internal_port) for m in maps],
                        ("VM", "PROTOCOL", "HOST ADDRESS", "EXTERNAL PORT", "INTERNAL PORT"))
    elif not svc.delete_port_mapping(args.vm, args.protocol, args.external_port,
                                     args.host_address):
        port = HostPort.parse(args.protocol, args.external_port, args.host_address)
        print(f"{PROG}: vm {args.vm!r} has no port mapping {port.describe()} "
              "(nothing to delete)", file=sys.stderr)
    return 0


class _Usage(HnsError):
    exit_code = 2


def _up(svc: Service, args: argparse.Namespace) -> int:
    from hns import cli_up
    return cli_up.up_cmd(svc, args)


def _config(svc: Service | None, args: argparse.Namespace) -> int:
    from hns import cli_up
    return cli_up.config_cmd(svc, args)


def _reload(svc: Service, args: argparse.Namespace) -> int:
    from hns import cli_up
    return cli_up.reload_cmd(svc, args)


def _down(svc: Service, args: argparse.Namespace) -> int:
    from hns import cli_up
    return cli_up.down(svc, args)


def _restore(svc: Service, args: argparse.Namespace) -> int:
    made = svc.restore()
    if args.json:
        _print_json(made)
    for line in [] if args.json else made:
        print(f"restored {line}")
    return 0


def _gc(svc: Service, args: argparse.Namespace) -> int:
    found = svc.gc(dry_run=args.dry_run)
    if args.json:
        _print_json(found)
    else:
        verb = "would remove" if args.dry_run else "removed"
        for item in found:
            print(f"{verb} {item}")
    return 0


def _gc_sandboxes(args: argparse.Namespace) -> int:
    from hns.testing.sandbox import remove_stale_sandboxes
    found = remove_stale_sandboxes(dry_run=args.dry_run)
    if args.json:
        _print_json(found)
    for item in [] if args.json else found:
        print(f"{'would remove' if args.dry_run else 'removed'} {item}")
    return 0


Handler = Callable[[Service, argparse.Namespace], int]
COMMANDS: dict[str, Handler] = {
    "network": _network_cmd, "vm": _vm_cmd, "up": _up, "down": _down,
    "config": _config, "reload": _reload,
    "restore": _restore, "gc": _gc, "portmap": _portmap_cmd,
}


# Commands that may make the state directory; every other one only reads or removes,
# and on a state directory that does not exist says so instead of creating one.
MAKES_STATE = frozenset({("network", "create"), ("vm", "create"), ("portmap", "add"),
                         ("portproxy", "add"), ("portproxy", "set"), ("netsh", "add"),
                         ("netsh", "set"), ("up", None),
                         ("restore", None), ("daemon", None)})
PATH_MAX = 4096
NAME_MAX = 255


def check_state_dir(path: str, makes_state: bool) -> None:
    """InvalidRequest unless ``path`` can be the state directory of this command."""
    raw = os.fsencode(path)
    if not raw:
        raise InvalidRequest("invalid --state-dir '': empty")
    if len(raw) >= PATH_MAX or any(len(part) > NAME_MAX for part in raw.split(b"/")):
        raise InvalidRequest(f"invalid --state-dir {path!r}: name too long")
    if os.path.isdir(path):
        return
    if os.path.lexists(path):
        raise InvalidRequest(f"invalid --state-dir {path!r}: not a directory")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InvalidRequest(f"invalid --state-dir {path!r}: {parent} is not a directory")
    if not makes_state:
        raise InvalidRequest(f"state directory {path!r} does not exist (a create command "
                             "or 'hnsctl up' makes it)")


def check_host_netns(name: str | None) -> None:
    """InvalidRequest unless ``name`` (if given) is a mounted network namespace."""
    if name is None:
        return
    parse_netns_name(name, "host namespace")
    if not netns_exists(name):
        raise InvalidRequest(f"host namespace {name!r} does not exist")
    if not netns_mounted(name):
        raise InvalidRequest(f"host namespace {name!r} is not a network namespace "
                             f"(/run/netns/{name} is not a mounted namespace)")


def _from_settings(args: argparse.Namespace) -> None:
    """The state directory and host namespace the settings file names, when neither a
    flag nor the environment did."""
    if args.state_dir is not None and args.host_netns is not None:
        return
    from hns.config_apply import read
    found = read(args.config)
    if args.cluster is None:
        args.cluster = found.cluster
        args.host_name = args.host_name or found.host_name
    if args.state_dir is None:
        args.state_dir = found.state_dir or DEFAULT_STATE_DIR
    if args.host_netns is None:
        args.host_netns = found.host_netns


def _run(args: argparse.Namespace) -> int:
    if args.command == "config":       # the settings alone: no state directory needed
        return _config(None, args)
    if args.command == "gc" and args.sandboxes:     # no state directory either
        return _gc_sandboxes(args)
    _from_settings(args)
    check_state_dir(args.state_dir,
                    (args.command, getattr(args, "action", None)) in MAKES_STATE)
    check_host_netns(args.host_netns)
    from hns.cluster.config import cluster_config
    cluster = cluster_config(args.cluster, args.host_name, args.cluster_ttl,
                             args.cluster_address, args.host_netns)
    with Service(args.state_dir, args.host_netns, cluster=cluster) as svc:
        from hns.cli_cluster import HANDLERS as CLUSTER
        from hns.cli_observe import HANDLERS as OBSERVE
        from hns.daemon.cli import HANDLERS
        handler: Handler = {**COMMANDS, **HANDLERS, **OBSERVE, **CLUSTER}[args.command]
        return handler(svc, args)


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"{line_prefix(logging.ERROR, sys.stderr)}{PROG}: error: {_one_line(message)}",
          file=sys.stderr)
    return code


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``argv`` parsed; capture's filter words may also follow its options, as tcpdump's
    do (``capture vm0 -w f.pcap icmp``)."""
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) == "capture" and not any(
            word.startswith("-") for word in extra):
        args.filter = [*args.filter, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _main(argv: Sequence[str] | None) -> int:
    debug = False
    try:
        parser = _build_parser()
        _completion(parser)
        args = parse(parser, argv)
        debug = args.debug
        configure_logging(args.log_level, debug)
        return _run(args)
    except HnsError as exc:
        return _fail(str(exc), exc.exit_code, debug)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as exc:
        if stdout_closed():
            raise
        return _fail(f"unexpected error ({type(exc).__name__}): {exc}", 1, debug)
    except Exception as exc:  # a bug: still one line, the traceback with --debug
        return _fail(f"unexpected error ({type(exc).__name__}): {exc}", 1, debug)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            if sys.stdout is not None:
                sys.stdout.flush()  # here, where a closed stdout can still be caught
    except BrokenPipeError:
        silence_stdout()
        return 0


if __name__ == "__main__":
    sys.exit(main())
