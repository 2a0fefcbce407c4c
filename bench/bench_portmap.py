"""Benchmark of kernel port mappings in hns, hermetic: everything runs in a Sandbox.

What it measures, in two sandboxes, each with a NAT network ``bench`` and a VM ``srv``
running an iperf3 server (port 5201) reached through one mapping; the second sandbox
also has a VM ``filler`` that holds ``--count`` more mappings:

1. install: ``--count`` mappings (TCP, ports 30000 up, to ``filler``) through the Python
   API in one call of ``Service.add_port_mappings`` (one store transaction, one nft
   transaction); and ``vm delete filler`` at the end, which removes them all;
2. one more: ``Service.add_port_mapping`` of one mapping while ``--count`` exist, then its
   ``delete_port_mapping``, ``--trials`` times: median and p90; the same through the CLI
   (a subprocess each, so interpreter start-up counts), ``--cli-trials`` times;
3. throughput: iperf3 (``-t --seconds``, ``-O 1``) from the outside namespace to the
   host's uplink address at the port mapped to ``srv``, with one mapping (first sandbox)
   and with ``--count`` + 1 mappings (second sandbox), with one mapping on a network
   whose isolation is off (``--firewall off``, a third sandbox: no forward chain, the
   data path before isolation existed), and a direct baseline from the host namespace to
   the VM's own address (the outside has no route to the VM); the paths are taken in
   turn, ``--runs`` rounds, and the median of each is reported, with the median and
   range of the per-round ratio isolation on / off.
   For information also the outside reaching the VM's address through the host without
   NAT (a route to the subnet added to the outside namespace for that run only; in the
   sandbox without isolation, since isolation keeps the outside out): the same path as a
   mapped connection, so the ratio to it is the cost of the DNAT itself.

How: a :class:`hns.testing.sandbox.Sandbox` (a namespace playing the host, one playing the
outside network, a private state directory) is closed in a ``finally``, also on Ctrl-C
or SIGTERM, and removes every namespace, process, link and nft table it made.  Two
sandboxes, rather than one measured before and after, let the throughput runs with one
and with many mappings alternate: on a shared machine the rate drifts by tens of percent
within a minute, and a comparison of runs made minutes apart measures the drift.  Times
come from ``time.perf_counter``; throughput is iperf3's receiver figure.

The goals are printed with PASS/MISS, not asserted: the exit status is 0 whether or not a
goal is met, 1 on an actual error, 130 on Ctrl-C.  ``--json`` prints the figures as one
JSON object on stdout instead of the table (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from harness import iperf_gbps, positive_int, progress, run_hermetic

from hns.model import PortMapping, Protocol
from hns.service import Service
from hns.testing.sandbox import Peer, Sandbox

NETWORK = "bench"
IPERF_PORT = 5201
SRV_PORT = 20000  # the host port mapped to srv:5201
FILL_BASE = 30000  # the filler's mappings: FILL_BASE, FILL_BASE + 1, ...
ONE_MORE_PORT = 25000
GOAL_INSTALL_S = 2.0
GOAL_ONE_MORE_MS = 50.0
GOAL_SCALE_RATIO = 0.95
GOAL_DIRECT_RATIO = 0.9
GOAL_ISOLATION_RATIO = 0.98


@dataclass(frozen=True)
class Stats:
    """Summary of one series of timings, in milliseconds."""

    n: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats:
        ms = [s * 1000.0 for s in seconds]
        p90 = statistics.quantiles(ms, n=10, method="inclusive")[8] if len(ms) > 1 else ms[0]
        return cls(n=len(ms), median_ms=statistics.median(ms), p90_ms=p90,
                   mean_ms=statistics.fmean(ms), min_ms=min(ms), max_ms=max(ms))


def timed(fn: Callable[..., object], *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def wait_listening(peer: Peer, port: int) -> None:
    for _ in range(200):
        if peer.run(["ss", "-Hlnt", f"sport = :{port}"]).stdout.strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} in {peer.netns}")


@dataclass(frozen=True)
class Throughput:
    direct_gbps: float
    routed_gbps: float
    one_gbps: float
    many_gbps: float
    open_gbps: float                            # one mapping, isolation off
    isolation_ratios: tuple[float, ...]         # per round: isolation on / off


@dataclass(frozen=True)
class Goal:
    name: str
    value: float
    limit: float
    unit: str
    at_most: bool

    @property
    def passed(self) -> bool:
        return self.value <= self.limit if self.at_most else self.value >= self.limit


@dataclass(frozen=True)
class Results:
    count: int
    install_s: float
    delete_vm_s: float
    one_more: Stats
    one_less: Stats
    cli_one_more: Stats
    throughput: Throughput

    def goals(self) -> list[Goal]:
        t = self.throughput
        return [
            Goal(f"install {self.count} mappings", self.install_s, GOAL_INSTALL_S, "s", True),
            Goal(f"one more at {self.count} (median, API)", self.one_more.median_ms,
                 GOAL_ONE_MORE_MS, "ms", True),
            Goal(f"throughput at {self.count} / at one", t.many_gbps / t.one_gbps,
                 GOAL_SCALE_RATIO, "x", False),
            Goal("throughput mapped / direct", t.one_gbps / t.direct_gbps, GOAL_DIRECT_RATIO,
                 "x", False),
            Goal("throughput isolation on / off (median)",
                 statistics.median(t.isolation_ratios), GOAL_ISOLATION_RATIO, "x", False),
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count, "install_s": self.install_s, "delete_vm_s": self.delete_vm_s,
            "one_more": asdict(self.one_more), "one_less": asdict(self.one_less),
            "cli_one_more": asdict(self.cli_one_more), "throughput": asdict(self.throughput),
            "goals": [{"name": g.name, "value": g.value, "limit": g.limit, "unit": g.unit,
                       "pass": g.passed} for g in self.goals()],
        }


def throughput(one: Sandbox, many: Sandbox, open_: Sandbox,
               args: argparse.Namespace) -> Throughput:
    """iperf3 through each path, the paths taken in turn (direct, routed, one mapping,
    many mappings, one mapping without isolation; ``--runs`` rounds) so that a busy
    moment of the machine hits them alike; the median of each."""
    srv_ip = str(one.service.get_vm("srv").ip)
    open_ip = str(open_.service.get_vm("srv").ip)
    # routed without NAT: only a network without isolation lets the outside in
    subnet = str(open_.service.get_network(NETWORK).subnet)
    route = open_.outside.run(["ip", "route", "add", subnet, "via", open_.uplink_ip])
    if route.returncode != 0:
        raise RuntimeError(f"ip route add: {route.stderr.strip()}")
    paths: list[tuple[Peer, str, int]] = [
        (one.host, srv_ip, IPERF_PORT),                # direct: host -> VM address
        (open_.outside, open_ip, IPERF_PORT),          # routed through the host, no NAT
        (one.outside, one.uplink_ip, SRV_PORT),        # one mapping
        (many.outside, many.uplink_ip, SRV_PORT),      # --count + 1 mappings
        (open_.outside, open_.uplink_ip, SRV_PORT),    # one mapping, isolation off
    ]
    samples: list[list[float]] = [[] for _ in paths]
    try:
        for i in range(args.runs):
            progress(f"  iperf3 round {i + 1}/{args.runs}")
            for sample, (client, host, port) in zip(samples, paths, strict=True):
                sample.append(iperf_gbps(client, host, port, args.seconds))
    finally:
        open_.outside.run(["ip", "route", "del", subnet])
    direct, routed, single, scaled, opened = (statistics.median(x) for x in samples)
    ratios = tuple(on / off for on, off in zip(samples[2], samples[4], strict=True))
    return Throughput(direct, routed, single, scaled, opened, ratios)


def setup(sandbox: Sandbox, firewall: bool = True) -> Service:
    """The network, the VM ``srv`` with an iperf3 server, its one mapping."""
    svc: Service = sandbox.service
    progress(f"sandbox {sandbox.host_netns}, state {sandbox.state_dir}")
    svc.create_network(NETWORK, "nat", firewall=firewall)
    srv = sandbox.vm("srv", NETWORK)
    srv.popen(["iperf3", "-s", "-p", str(IPERF_PORT)])
    wait_listening(srv, IPERF_PORT)
    svc.add_port_mapping("srv", "tcp", SRV_PORT, IPERF_PORT)
    return svc


def bench_one_more(svc: Service, trials: int) -> tuple[Stats, Stats]:
    """Add one mapping and delete it again, ``trials`` times, each step timed."""
    adds: list[float] = []
    deletes: list[float] = []
    for i in range(trials):
        port = ONE_MORE_PORT + i
        adds.append(timed(svc.add_port_mapping, "srv", "tcp", port, IPERF_PORT))
        deletes.append(timed(svc.delete_port_mapping, "srv", "tcp", port))
    return Stats.of(adds), Stats.of(deletes)


def bench_cli_one_more(sandbox: Sandbox, trials: int) -> Stats:
    def add(port: int) -> None:
        result = sandbox.hnsctl("portmap", "add", "srv", "--protocol", "tcp", "--external-port",
                                str(port), "--internal-port", str(IPERF_PORT))
        if result.returncode != 0:
            raise RuntimeError(f"hnsctl portmap add: {result.stderr.strip()}")
    adds: list[float] = []
    for i in range(trials):
        port = ONE_MORE_PORT + 1000 + i
        adds.append(timed(add, port))
        sandbox.service.delete_port_mapping("srv", "tcp", port)
    return Stats.of(adds)


def run(args: argparse.Namespace) -> Results:
    """Three sandboxes: one keeps a single mapping, the other gets ``--count`` more, the
    third has a single mapping on a network without isolation."""
    sandboxes: list[Sandbox] = []
    try:
        for _ in range(3):
            sandboxes.append(Sandbox())
        one, many, open_ = sandboxes
        setup(one)
        setup(open_, firewall=False)
        svc = setup(many)
        many.vm("filler", NETWORK)
        progress(f"installing {args.count} mappings in one call")
        batch = [PortMapping("filler", Protocol.TCP, FILL_BASE + i, IPERF_PORT)
                 for i in range(args.count)]
        install = timed(svc.add_port_mappings, batch)
        progress(f"one more mapping: {args.trials} API and {args.cli_trials} CLI trials")
        one_more, one_less = bench_one_more(svc, args.trials)
        cli_one_more = bench_cli_one_more(many, args.cli_trials)
        progress(f"iperf3: {args.runs} rounds of 5 paths, {args.seconds} s each")
        rates = throughput(one, many, open_, args)
        delete_vm = timed(svc.delete_vm, "filler")
        return Results(args.count, install, delete_vm, one_more, one_less, cli_one_more,
                       rates)
    finally:
        progress("closing the sandboxes")
        for sandbox in sandboxes:
            sandbox.close()


def _stats_row(label: str, s: Stats) -> str:
    return (f"{label:<34}{s.n:>5}{s.median_ms:>10.1f}{s.p90_ms:>10.1f}{s.mean_ms:>10.1f}"
            f"{s.min_ms:>10.1f}{s.max_ms:>10.1f}")


def _goal_row(g: Goal) -> str:
    if g.unit == "x":
        value, limit = f"{g.value:.3f}x", f"{g.limit:.2f}x"
    else:
        value, limit = f"{g.value:.3f} {g.unit}", f"{g.limit:g} {g.unit}"
    sign = "<= " if g.at_most else ">= "
    return f"{g.name:<44}{value:>12}{sign + limit:>12}  {'PASS' if g.passed else 'MISS'}"


def print_table(r: Results) -> None:
    t = r.throughput
    print(f"install {r.count} mappings (one call):   {r.install_s:.3f} s")
    print(f"vm delete with {r.count} mappings:       {r.delete_vm_s:.3f} s")
    print()
    print(f"{'operation':<34}{'n':>5}{'median':>10}{'p90':>10}{'mean':>10}{'min':>10}"
          f"{'max':>10}   (ms)")
    print(_stats_row(f"add one at {r.count} (API)", r.one_more))
    print(_stats_row(f"delete one at {r.count} (API)", r.one_less))
    print(_stats_row(f"add one at {r.count} (CLI)", r.cli_one_more))
    print()
    rows = [("direct, host -> VM address", t.direct_gbps),
            ("routed, outside -> VM address, no NAT", t.routed_gbps),
            ("outside -> host port, 1 mapping", t.one_gbps),
            (f"outside -> host port, {r.count + 1} mappings", t.many_gbps),
            ("outside -> host port, 1 mapping, no isolation", t.open_gbps)]
    for label, gbps in rows:
        print(f"iperf3 {label:<44}{gbps:8.2f} Gbit/s")
    print(f"(for information: 1 mapping / routed without NAT = {t.one_gbps / t.routed_gbps:.3f})")
    ratios = t.isolation_ratios
    print(f"isolation on / off per round: median {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f} ({len(ratios)} rounds)")
    print()
    print(f"{'goal':<44}{'value':>12}{'limit':>12}  result")
    for g in r.goals():
        print(_goal_row(g))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--count", type=positive_int, default=10000,
                   help="mappings installed (default %(default)s)")
    p.add_argument("--trials", type=positive_int, default=20,
                   help="API add/delete pairs at --count (default %(default)s)")
    p.add_argument("--cli-trials", type=positive_int, default=5,
                   help="CLI adds at --count (default %(default)s)")
    p.add_argument("--seconds", type=positive_int, default=5,
                   help="iperf3 run length (default %(default)s)")
    p.add_argument("--runs", type=positive_int, default=3,
                   help="iperf3 runs per configuration, median (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = p.parse_args(argv)
    if FILL_BASE + args.count > 65536:
        p.error(f"--count at most {65536 - FILL_BASE}")
    return args


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
