"""Benchmark of mirrored networks, hermetic: everything runs in one Sandbox.

Setup: a mirrored network ``bench`` with one VM ``vm``, a NAT network ``nat`` with one
VM ``natvm``; an iperf3 server in the outside
namespace (port 5201) and one in the VM (port 5202); the daemon as a subprocess
(``hnsctl daemon``, as the tests run it) in the sandbox's host namespace, for inbound.

Measures, iperf3 (``-t --seconds``, ``-O 1``, the receiver's rate), the paths taken in
turn ``--runs`` rounds so that a busy moment of the machine hits them alike, the median
of each:

1. outbound: the VM to the outside server (its traffic leaves from the host's address:
   SNAT to the transit address in the VM, masquerade in the host), against the host
   namespace itself to the same server (the baseline: the host's own path out); for
   information also a VM on a NAT network ``nat`` beside it to the same server (the same
   hops without the mirrored translation in the VM);
2. inbound: the outside to the host's address at port 5202, which the daemon forwards
   to the VM (DNAT to the transit address in the host, DNAT to the mirrored address in
   the VM), against the host namespace to the VM's transit address at the same port
   (the baseline: the same server, one hop and no host DNAT).  Before measuring, a
   connect attempt from the outside tells whether the daemon forwards at all (retried
   for ``--inbound-wait`` seconds while the daemon notices the VM's listener); if it
   does not, the report says "inbound: not available" and why, and nothing fails.

Goals (printed with PASS/MISS, not asserted): outbound >= 0.9x the host's own rate;
inbound >= 0.9x the direct one (both paths are kernel NAT, no userspace copy).

The sandbox is closed in a ``finally`` (also on Ctrl-C or SIGTERM) and the daemon is
stopped there.  Exit status 0 whether or not a goal is met, 1 on an error, 130 on
Ctrl-C.  ``--json`` prints the figures as one JSON object on stdout instead of the table.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harness import (
    Daemon,
    iperf_gbps,
    positive_int,
    progress,
    run_hermetic,
    start_daemon,
    wait_until,
)

from hns.testing.sandbox import Peer, Sandbox, SandboxVm

NETWORK = "bench"
OUT_PORT = 5201          # the iperf3 server in the outside namespace
VM_PORT = 5202           # the iperf3 server in the VM, reached at the host's address
GOAL_OUTBOUND = 0.9
GOAL_INBOUND = 0.9
NOT_FORWARDING = "the daemon does not forward"


@dataclass(frozen=True)
class Pair:
    """A path's median rate beside its baseline's, in Gbit/s."""

    measured: float
    baseline: float

    @property
    def ratio(self) -> float:
        return self.measured / self.baseline if self.baseline else 0.0


@dataclass(frozen=True)
class Results:
    runs: int
    seconds: int
    outbound: Pair
    nat_outbound_gbps: float
    inbound: Pair | None
    inbound_note: str       # why inbound was not measured ("" when it was)

    def goals(self) -> list[tuple[str, float, float, bool]]:
        out = [("outbound: VM / host namespace", self.outbound.ratio, GOAL_OUTBOUND,
                self.outbound.ratio >= GOAL_OUTBOUND)]
        if self.inbound is not None:
            out.append(("inbound: via host address / direct", self.inbound.ratio,
                        GOAL_INBOUND, self.inbound.ratio >= GOAL_INBOUND))
        return out

    def to_json(self) -> dict[str, Any]:
        def pair(p: Pair | None) -> dict[str, float] | None:
            return None if p is None else {"gbps": p.measured, "baseline_gbps": p.baseline,
                                           "ratio": p.ratio}
        return {"runs": self.runs, "seconds": self.seconds,
                "outbound": pair(self.outbound), "nat_outbound_gbps": self.nat_outbound_gbps,
                "inbound": pair(self.inbound),
                "inbound_note": self.inbound_note or None,
                "goals": [{"name": n, "value": v, "limit": g, "pass": met}
                          for n, v, g, met in self.goals()]}


def listening(peer: Peer, port: int) -> bool:
    return bool(peer.run(["ss", "-Hlnt", f"sport = :{port}"]).stdout.strip())


def start_iperf_server(peer: Peer, port: int) -> None:
    peer.popen(["iperf3", "-s", "-p", str(port)], stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL)
    wait_until(lambda: listening(peer, port), f"iperf3 on port {port} in {peer.netns}")


def inbound_reachable(sb: Sandbox, port: int) -> bool:
    """One TCP connect from the outside to the host's address at ``port``."""
    with sb.outside.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((sb.uplink_ip, port)) == 0


def check_inbound(sb: Sandbox, daemon: Daemon, port: int, seconds: float) -> str:
    """"" when the outside reaches the VM's server at the host's address, else why not."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reason = daemon.exited()
        if reason is not None:
            return f"the daemon stopped ({reason})"
        if inbound_reachable(sb, port):
            return ""
        time.sleep(0.2)
    return NOT_FORWARDING


# -- measurement -------------------------------------------------------------------------


def throughput(sb: Sandbox, vm: SandboxVm, nat_vm: SandboxVm, inbound: bool,
               args: argparse.Namespace) -> tuple[Pair, float, Pair | None]:
    paths: dict[str, tuple[Peer, str, int]] = {
        "host out": (sb.host, sb.outside_ip, OUT_PORT),
        "vm out": (vm, sb.outside_ip, OUT_PORT),
        "nat out": (nat_vm, sb.outside_ip, OUT_PORT),
    }
    if inbound:
        paths["direct in"] = (sb.host, vm.ip, VM_PORT)
        paths["mirrored in"] = (sb.outside, sb.uplink_ip, VM_PORT)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(args.runs):
        progress(f"  iperf3 round {i + 1}/{args.runs}")
        for name, (client, host, port) in paths.items():
            samples[name].append(iperf_gbps(client, host, port, args.seconds))
    med = {name: statistics.median(values) for name, values in samples.items()}
    outbound = Pair(med["vm out"], med["host out"])
    return outbound, med["nat out"], (Pair(med["mirrored in"], med["direct in"]) if inbound
                                      else None)


def run(args: argparse.Namespace) -> Results:
    sb = Sandbox()
    daemon: Daemon | None = None
    try:
        progress(f"sandbox {sb.host_netns}, state {sb.state_dir}")
        sb.service.create_network(NETWORK, "mirrored")
        vm = sb.vm("vm", NETWORK)
        sb.service.create_network("nat", "nat")
        nat_vm = sb.vm("natvm", "nat")
        start_iperf_server(sb.outside, OUT_PORT)
        start_iperf_server(vm, VM_PORT)
        try:
            daemon, note = start_daemon(sb), ""
        except RuntimeError as exc:
            note = f"the daemon did not start ({exc})"
        if daemon is not None:
            progress(f"checking inbound forwarding (up to {args.inbound_wait} s)")
            note = check_inbound(sb, daemon, VM_PORT, args.inbound_wait)
        paths = 3 if note else 5
        progress(f"iperf3: {args.runs} rounds of {paths} paths, {args.seconds} s each")
        outbound, nat_out, inbound = throughput(sb, vm, nat_vm, not note, args)
        return Results(args.runs, args.seconds, outbound, nat_out, inbound, note)
    finally:
        progress("closing the sandbox")
        if daemon is not None:
            daemon.stop()
        sb.close()


def print_table(r: Results) -> None:
    o = r.outbound
    print(f"{'outbound, VM -> outside':<34}{o.measured:6.2f} Gbit/s, baseline host namespace "
          f"-> outside {o.baseline:6.2f} Gbit/s = {o.ratio:.3f}x   goal >= {GOAL_OUTBOUND:g}x")
    print(f"(for information: a NAT VM -> outside {r.nat_outbound_gbps:6.2f} Gbit/s = "
          f"{r.nat_outbound_gbps / o.baseline:.3f}x the host namespace)")
    i = r.inbound
    if i is None:
        print(f"inbound: not available ({r.inbound_note})")
    else:
        print(f"{'inbound, outside -> host address':<34}{i.measured:6.2f} Gbit/s, baseline host "
              f"-> VM transit address {i.baseline:6.2f} Gbit/s = {i.ratio:.3f}x   "
              f"goal >= {GOAL_INBOUND:g}x")
    print(f"(median of {r.runs} rounds, {r.seconds} s each, the paths taken in turn)")
    print()
    print(f"{'goal':<44}{'value':>10}{'goal':>10}  result")
    for name, value, goal, met in r.goals():
        print(f"{name:<44}{value:>9.3f}x{goal:>9.2f}x  {'PASS' if met else 'MISS'}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=positive_int, default=5,
                   help="iperf3 run length (default %(default)s)")
    p.add_argument("--runs", type=positive_int, default=3,
                   help="iperf3 rounds, median (default %(default)s)")
    p.add_argument("--inbound-wait", type=positive_int, default=10,
                   help="seconds to wait for the daemon to forward inbound "
                        "(default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def report(results: Results) -> None:
        if args.json:
            print(json.dumps(results.to_json(), indent=2))
        else:
            print_table(results)
    return run_hermetic(lambda: run(args), report, tools=("iperf3",))


if __name__ == "__main__":
    sys.exit(main())
