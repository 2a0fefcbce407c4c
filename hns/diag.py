"""``hnsctl diag``: a VM's network checked step by step, and where it breaks.

Theory of operation: nine steps, in the order a packet needs them (:data:`STEPS`): the
VM's namespace and eth0, its address and default route, the gateway at layer 2 (ARP)
and layer 3 (ICMP echo), the DNS proxy on the gateway, a TCP handshake to ``--target``,
the path MTU to the gateway, and on the host side the NAT table with IPv4 forwarding
and the daemon.  Each step is timed and every wait in it is bounded
(:mod:`hns.diag_probes`), so a healthy VM takes a few milliseconds and a broken one a
few seconds at most.

A failing step does not stop the others.  A step that cannot run because a step it
needs failed (:data:`NEEDS`; some failures still let the next steps run,
:data:`TOLERATED`) is skipped, its detail naming that step.  The report says the network
breaks at the first failure that no other failure explains (:data:`EXPLAINED_BY`: no
DNS proxy when no daemon runs, no TCP handshake without a route, a gateway or NAT).  Hints are
commands to run, from a table keyed by step and cause (:data:`HINTS`).

Everything here is pure but the default probes of :func:`diagnose`
(:class:`hns.diag_probes.KernelProbes`); tests give it others (:class:`Probes`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from hns.errors import HnsError, InvalidRequest

if TYPE_CHECKING:
    from hns.model import Network, Vm

__all__ = ["NEEDS", "STEPS", "Echo", "MtuResult", "Outcome", "Probes", "Report", "Step",
           "diag_cmd", "diagnose", "next_sizes", "parse_target", "search_mtu"]

STEPS = ("vm-netns", "address-route", "arp-gateway", "icmp-gateway", "dns-gateway",
         "tcp-target", "path-mtu", "host-nat", "daemon")
NEEDS: dict[str, tuple[str, ...]] = {
    "address-route": ("vm-netns",),
    "arp-gateway": ("address-route",),
    "icmp-gateway": ("arp-gateway",),
    "dns-gateway": ("arp-gateway",),
    "tcp-target": ("address-route",),
    "path-mtu": ("arp-gateway", "icmp-gateway"),
}
TOLERATED: dict[str, frozenset[str]] = {"address-route": frozenset({"no-route"})}
SKIP_WHY = {
    "vm-netns": "no namespace or eth0 to probe from",
    "address-route": "eth0 lacks the VM's address or its subnet",
    "arp-gateway": "the gateway does not answer on the link",
    "icmp-gateway": "the gateway does not answer echo requests",
}
EXPLAINED_BY: dict[str, tuple[str, ...]] = {
    "dns-gateway": ("daemon",),
    "tcp-target": ("address-route", "arp-gateway", "host-nat"),
}
MIN_MTU_PROBE = 68          # IPv4's smallest MTU (RFC 791)
RESULTS = {True: "pass", False: "fail", None: "skip"}


@dataclass(frozen=True)
class Step:
    """One step of a report; ``ok`` None: skipped (``detail`` says why)."""

    name: str
    ok: bool | None
    seconds: float
    detail: str
    hint: str

    @property
    def result(self) -> str:
        return RESULTS[self.ok]

    def to_json(self) -> dict[str, Any]:
        return {"Name": self.name, "Result": self.result, "Seconds": round(self.seconds, 6),
                "Detail": self.detail, "Hint": self.hint}


@dataclass(frozen=True)
class Report:
    vm: str
    steps: tuple[Step, ...]

    @property
    def ok(self) -> bool:
        """No step failed (skipped ones do not count)."""
        return all(s.ok is not False for s in self.steps)

    def breaks_at(self) -> tuple[Step, list[Step], list[Step]] | None:
        """Where it breaks: the first failure no other failure explains, the failures it
        explains, and the other unexplained ones; None when nothing failed."""
        failed = {s.name: s for s in self.steps if s.ok is False}
        roots = [s for s in failed.values()
                 if not any(c in failed for c in EXPLAINED_BY.get(s.name, ()))]
        if not roots:
            return None
        root = roots[0]
        caused = [s for s in failed.values() if root.name in EXPLAINED_BY.get(s.name, ())]
        return root, caused, roots[1:]

    def summary(self) -> str:
        found = self.breaks_at()
        if found is None:
            skipped = sum(s.ok is None for s in self.steps)
            return "all steps passed" + (f" ({skipped} skipped)" if skipped else "")
        root, caused, others = found
        line = f"breaks at {root.name}: {root.detail}"
        if caused:
            names = ", ".join(s.name for s in caused)
            line += f"; {names} fail{'s' if len(caused) == 1 else ''} because of it"
        if others:
            line += f"; also failing: {', '.join(s.name for s in others)}"
        return line

    def to_json(self) -> dict[str, Any]:
        found = self.breaks_at()
        return {"Vm": self.vm, "Ok": self.ok, "BreaksAt": found[0].name if found else None,
                "Summary": self.summary(), "Steps": [s.to_json() for s in self.steps]}

    def text(self) -> str:
        width = max([len("STEP"), *(len(s.name) for s in self.steps)])
        lines = [f"diag of vm {self.vm}",
                 f"{'STEP':<{width}}  RESULT  {'TIME':>9}  DETAIL"]
        for s in self.steps:
            took = "-" if s.ok is None else f"{s.seconds * 1000:.1f} ms"
            lines.append(f"{s.name:<{width}}  {s.result.upper():<6}  {took:>9}  {s.detail}")
            if s.ok is False and s.hint:
                lines.append(f"{'':<{width}}  {'':<6}  {'':>9}  hint: {s.hint}")
        lines.append(self.summary())
        return "\n".join(lines)


# what the probes give


@dataclass(frozen=True)
class Outcome:
    """What a probe found: ``cause`` keys :data:`HINTS` when it failed, ``value`` is what a
    later step uses (the gateway's MAC, from ARP)."""

    ok: bool
    detail: str
    cause: str = ""
    value: str = ""


class Echo(NamedTuple):
    """One DF echo of the path MTU search: ``whole`` (answered, not fragmented),
    ``fragmented`` (answered in pieces; ``first_fragment``: the first one's length),
    ``lost`` (no answer in time), ``dropped`` (refused at once by eth0's peer: the
    veth's host side takes less) or ``unsent`` (bigger than eth0 takes)."""

    kind: str
    first_fragment: int = 0


class Probes(Protocol):
    """The kernel side of the steps (:class:`hns.diag_probes.KernelProbes`)."""

    def vm_netns(self) -> Outcome: ...
    def address_route(self) -> Outcome: ...
    def arp_gateway(self) -> Outcome: ...
    def icmp_gateway(self) -> Outcome: ...
    def dns_gateway(self) -> Outcome: ...
    def tcp_target(self, target: tuple[str, int]) -> Outcome: ...
    def df_echoes(self, gateway_mac: str, sizes: Sequence[int]) -> dict[int, Echo]: ...
    def host_mtus(self) -> dict[str, int]: ...
    def host_nat(self) -> Outcome: ...
    def daemon(self) -> Outcome: ...
    def close(self) -> None: ...


ProbesFactory = Callable[[Any, "Vm", "Network"], Probes]


# --target


def parse_target(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[ADDR]:PORT`` for IPv6) as (address, port); InvalidRequest."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise InvalidRequest(f"invalid --target {text!r}: expected ADDR:PORT "
                             "(e.g. 198.51.100.1:80)")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        addr = ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        raise InvalidRequest(f"invalid --target {text!r}: {host!r} is not an IP "
                             "address") from None
    if isinstance(addr, IPv6Address) != bracketed:
        raise InvalidRequest(f"invalid --target {text!r}: write an IPv6 address in "
                             "brackets, [ADDR]:PORT, and an IPv4 one without")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise InvalidRequest(f"invalid --target {text!r}: the port must be 1-65535")
    return str(addr), int(port)


def format_target(target: tuple[str, int]) -> str:
    host, port = target
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# the path MTU search (pure: the probe is given)


def next_sizes(lo: int, hi: int, k: int) -> list[int]:
    """Up to ``k`` sizes strictly between ``lo`` (came back whole) and ``hi`` (did not),
    spread evenly; none when nothing is left between them."""
    n = min(k, hi - lo - 1)
    return [lo + i * (hi - lo) // (n + 1) for i in range(1, n + 1)] if n > 0 else []


@dataclass(frozen=True)
class MtuResult:
    full: int                   # the size that must pass: the VM's MTU
    echoes: dict[int, Echo]     # the first round: the full size and the network's MTU
    largest: int | None         # the largest size that came back whole
    exact: bool                 # the next size up is known to fail
    probes: int
    rounds: int

    @property
    def ok(self) -> bool:
        return self.echoes[self.full].kind == "whole"


def search_mtu(probe: Callable[[Sequence[int]], dict[int, Echo]], full: int,
               extra: Sequence[int] = (), floor: int = MIN_MTU_PROBE, per_round: int = 12,
               rounds: int = 4) -> MtuResult:
    """The largest DF echo that comes back whole, in at most ``rounds`` rounds of
    ``per_round`` sizes sent at once.  Round one: ``full`` and ``extra``; if ``full``
    fails, each further round narrows the gap between the largest size that passed and
    the smallest that failed (straight to the eight sizes a fragment's length points at,
    when a reply came back fragmented)."""
    first = sorted({full, *(s for s in extra if floor <= s <= full)})
    echoes = probe(first)
    count, done = len(first), 1
    lo, hi = floor - 1, full
    hint = 0
    results = dict(echoes)
    while True:
        lo = max([lo, *(s for s, e in results.items() if e.kind == "whole")])
        hi = min([hi, *(s for s, e in results.items() if e.kind != "whole" and s > lo)])
        hint = max([hint, *(e.first_fragment for e in results.values())])
        if echoes[full].kind == "whole" or done >= rounds:
            break
        pointed = [s for s in range(hint, hint + 8) if lo < s < hi]
        sizes = pointed or next_sizes(lo, hi, per_round)
        if not sizes:
            break
        results = probe(sizes)
        count, done = count + len(sizes), done + 1
    exact = lo == full or hi - lo == 1
    return MtuResult(full, echoes, lo if lo >= floor else None, exact, count, done)


# hints


@dataclass(frozen=True)
class HintContext:
    vm: str
    netns: str
    ifname: str
    host_ifname: str
    bridge: str
    network: str
    gateway: str
    mtu: int
    net_mtu: int
    ip_host: str                # "ip" or "ip -n HOSTNS": iproute2 in the host namespace
    target: str
    mirrored: bool

    @classmethod
    def of(cls, host_netns: str | None, vm: Vm, net: Network,
           target: tuple[str, int] | None) -> HintContext:
        return cls(vm.name, vm.netns, vm.interface, vm.host_ifname, net.bridge, net.name,
                   str(vm.gateway), vm.mtu, net.mtu,
                   f"ip -n {host_netns}" if host_netns else "ip",
                   format_target(target) if target else "", net.mirrored)


RESTORE = "hnsctl restore (a running daemon also heals it within seconds)"
HINTS: dict[tuple[str, str], str] = {
    ("vm-netns", "stopped"): "hnsctl vm start {vm}",
    ("vm-netns", "no-netns"): "hnsctl restore (makes namespace {netns} and its eth0 again)",
    ("vm-netns", "no-eth0"): "hnsctl restore (makes the veth {host_ifname} / eth0 again)",
    ("vm-netns", "eth0-down"): "ip -n {netns} link set {ifname} up, or " + RESTORE,
    ("vm-netns", "no-carrier"): "{ip_host} link set {host_ifname} up (eth0's host side), "
                                "or hnsctl restore",
    ("address-route", "no-address"): RESTORE + ": gives eth0 its address and route again",
    ("address-route", "no-route"): RESTORE + ": puts back the default route via {gateway}",
    ("arp-gateway", "no-answer"): "is {host_ifname} a port of bridge {bridge}, both up? "
                                  "({ip_host} link show master {bridge}); hnsctl restore "
                                  "attaches it again",
    ("arp-gateway", "off-bridge"): "{ip_host} link set {host_ifname} master {bridge}, or "
                                   "hnsctl restore (puts it back on its bridge)",
    ("arp-gateway", "wrong-mac"): "another device answers for the gateway {gateway}: find "
                                  "it ({ip_host} neigh; ip -n {netns} neigh)",
    ("icmp-gateway", "no-answer"): "the host namespace drops ICMP to {gateway}: look at its "
                                   "firewall (nft list ruleset in the host namespace)",
    ("dns-gateway", "no-answer"): "the DNS proxy runs in the daemon: hnsctl daemon (or "
                                  "hnsctl up); hnsctl status shows its listener on {gateway}",
    ("tcp-target", "refused"): "{target} answers but nothing listens on that port",
    ("tcp-target", "timeout"): "no answer from {target}: look at the host-nat step, the "
                               "host's uplink and the target's firewall",
    ("tcp-target", "unreachable"): "no route to {target}: look at the address-route step",
    ("path-mtu", "bridge-mtu"): "{ip_host} link set {bridge} mtu {net_mtu} (or hnsctl "
                                "restore, which sets the network's MTU again)",
    ("path-mtu", "veth-mtu"): "{ip_host} link set {host_ifname} mtu {mtu}",
    ("path-mtu", "eth0-mtu"): "ip -n {netns} link set {ifname} mtu {mtu}",
    ("path-mtu", "lower-mtu"): "a link between eth0 and {gateway} carries less than {mtu} "
                               "bytes: compare the MTUs of {host_ifname} and {bridge}",
    ("host-nat", "no-table"): RESTORE + ": renders the NAT table again",
    ("host-nat", "drift"): RESTORE + ": renders the NAT table again",
    ("host-nat", "no-forward"): "hnsctl restore, or sysctl -w net.ipv4.ip_forward=1 in the "
                                "host namespace",
    ("host-nat", "nft-error"): "is nft installed (Debian: nftables)? Then hnsctl restore",
    ("host-nat", "no-vm-table"): RESTORE + ": makes the VM's table hns-mirror again",
    ("daemon", "no-daemon"): "hnsctl daemon (in the foreground) or hnsctl up (starts it)",
    ("daemon", "no-answer"): "the daemon does not answer on its control socket: stop it "
                             "and run hnsctl daemon again",
}
MIRRORED_HINTS: dict[tuple[str, str], str] = {
    ("address-route", "no-route"): "the VM mirrors the host's routes: give the host a "
                                   "default route, or run hnsctl restore",
}


def hint_for(step: str, cause: str, ctx: HintContext) -> str:
    text = MIRRORED_HINTS.get((step, cause)) if ctx.mirrored else None
    text = text or HINTS.get((step, cause))
    if text is None:
        return f"hnsctl restore, then hnsctl diag {ctx.vm} again"
    return text.format(**dataclasses.asdict(ctx))


# the run


def _path_mtu(probes: Probes, ctx: HintContext, gateway_mac: str) -> Outcome:
    found = search_mtu(lambda sizes: probes.df_echoes(gateway_mac, sizes), ctx.mtu,
                       extra=(ctx.net_mtu,))
    sizes = f"VM MTU {ctx.mtu}, network MTU {ctx.net_mtu}"
    if found.ok:
        return Outcome(True, f"a {ctx.mtu}-byte DF echo to {ctx.gateway} came back whole "
                             f"({sizes})")
    echo = found.echoes[ctx.mtu]
    how = {"fragmented": f"came back fragmented (first fragment {echo.first_fragment} "
                         "bytes)",
           "lost": "got no answer",
           "dropped": f"was dropped as it left {ctx.ifname} (its host side takes less)",
           "unsent": f"could not be sent ({ctx.ifname}'s MTU is lower)"}.get(echo.kind, "failed")
    best = (f"the largest that came back whole: {found.largest}"
            f"{'' if found.exact else ' or a little more'} bytes"
            if found.largest else "no size came back whole")
    detail = f"a {ctx.mtu}-byte DF echo to {ctx.gateway} {how}; {best} ({sizes}"
    mtus = probes.host_mtus()
    cause = "eth0-mtu" if echo.kind == "unsent" else "lower-mtu"
    links = [(ctx.bridge, "bridge"), (ctx.host_ifname, "veth")]
    for name, kind in links[::-1] if echo.kind == "dropped" else links:
        if mtus.get(name, ctx.mtu) < ctx.mtu:
            detail += f", {kind} {name} MTU {mtus[name]}"
            cause = f"{kind}-mtu" if cause == "lower-mtu" else cause
    return Outcome(False, detail + ")", cause)


def _blocker(name: str, outcomes: dict[str, Outcome], roots: dict[str, str]) -> str | None:
    """The failed step that keeps ``name`` from running, or None."""
    for dep in NEEDS.get(name, ()):
        if dep in roots:
            return roots[dep]
        out = outcomes.get(dep)
        if out is not None and not out.ok and out.cause not in TOLERATED.get(dep, ()):
            return dep
    return None


def run_steps(probes: Probes, ctx: HintContext, dns_proxy: bool,
              target: tuple[str, int] | None) -> list[Step]:
    """Every step of :data:`STEPS` in order, each timed, skipped where it cannot run."""
    outcomes: dict[str, Outcome] = {}
    roots: dict[str, str] = {}
    actions: dict[str, Callable[[], Outcome]] = {
        "vm-netns": probes.vm_netns, "address-route": probes.address_route,
        "arp-gateway": probes.arp_gateway, "icmp-gateway": probes.icmp_gateway,
        "dns-gateway": probes.dns_gateway,
        "tcp-target": lambda: probes.tcp_target(target) if target else Outcome(False, ""),
        "path-mtu": lambda: _path_mtu(probes, ctx, outcomes["arp-gateway"].value),
        "host-nat": probes.host_nat, "daemon": probes.daemon,
    }
    own = {"dns-gateway": None if dns_proxy else
           f"network {ctx.network} has the DNS proxy off: the VM asks the host's resolvers",
           "tcp-target": None if target else "no --target ADDR:PORT given"}
    steps = []
    for name in STEPS:
        reason = own.get(name)
        root = None if reason else _blocker(name, outcomes, roots)
        if root is not None:
            roots[name] = root
            reason = f"not run: {root} failed ({SKIP_WHY.get(root, 'see above')})"
        if reason:
            steps.append(Step(name, None, 0.0, reason, ""))
            continue
        start = time.perf_counter()
        try:
            out = actions[name]()
        except (OSError, HnsError) as exc:
            out = Outcome(False, f"the probe failed: {exc}", "error")
        outcomes[name] = out
        steps.append(Step(name, out.ok, time.perf_counter() - start, out.detail,
                          "" if out.ok else hint_for(name, out.cause, ctx)))
    return steps


def _kernel_probes(svc: Any, vm: Vm, net: Network) -> Probes:
    from hns.diag_probes import KernelProbes
    return KernelProbes(svc, vm, net)


def diagnose(svc: Any, vm_name: str, target: tuple[str, int] | None = None, *,
             probes: ProbesFactory | None = None) -> Report:
    """Check VM ``vm_name``'s network step by step (``target``: also a TCP handshake to
    it).  ``svc``: an :class:`hns.service.Service`; ``probes``: what looks at the kernel
    (default :class:`hns.diag_probes.KernelProbes`)."""
    if target is not None:
        host, port = target
        if isinstance(port, bool) or not isinstance(port, int):
            raise InvalidRequest(f"invalid target port {port!r}: not a number")
        target = parse_target(format_target((str(host), port)))
    vm = svc.get_vm(vm_name)
    net = svc.get_network(vm.network)
    made = (probes or _kernel_probes)(svc, vm, net)
    try:
        ctx = HintContext.of(svc.host_netns, vm, net, target)
        return Report(vm.name, tuple(run_steps(made, ctx, net.dns_proxy, target)))
    finally:
        made.close()


def diag_cmd(svc: Any, args: argparse.Namespace) -> int:
    """``hnsctl diag VM [--target ADDR:PORT] [--json]``: 0 when every step passed, 1 when
    one failed; a bad ``--target`` is refused (exit 2) before anything is probed."""
    target = parse_target(args.target) if args.target is not None else None
    report = diagnose(svc, args.vm, target)
    if getattr(args, "json", False):
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.text())
    return 0 if report.ok else 1
