"""Benchmark of ``hnsctl diag``, hermetic: everything runs in a Sandbox.

What it measures, on one NAT network ``bench`` with one VM, the sandbox's daemon running
and a TCP listener in the outside namespace as ``--target``:

1. ``diagnose()`` through the Python API on the healthy VM, ``--runs`` times after one
   untimed run (that one imports scapy's layers and makes the threads): the wall time's
   median and range, and each step's median;
2. the same through the CLI (``python -m hns.cli diag VM --target ADDR:PORT``, a
   subprocess each, so interpreter start-up and imports count), ``--runs`` times;
3. a broken VM, ``--broken-runs`` times: its network's bridge down, so that nothing
   answers it on the link and every probe that needs an answer (ARP, the TCP
   handshake) waits its whole timeout: the slow kind of failure.

How: a :class:`hns.testing.sandbox.Sandbox` gives a namespace playing the host, one
playing the outside network and a private state directory, so nothing touches this
machine's own namespace or state; the sandbox is closed in a ``finally`` (also on Ctrl-C
or SIGTERM).  Times come from ``time.perf_counter``.

Goals (printed with PASS/MISS, not asserted): a healthy VM's diag <= 1 s through the
CLI (median), a broken one's <= 3 s.  The machine is shared and noisy: medians and
ranges are what to quote.  ``--json`` prints the figures as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from harness import positive_int, progress, run_hermetic, start_daemon

from hns.daemon.control import request
from hns.diag import STEPS, diagnose
from hns.testing.sandbox import Sandbox

NETWORK = "bench"
VM = "vm0"
GOAL_HEALTHY_CLI_S = 1.0
GOAL_BROKEN_S = 3.0


@dataclass(frozen=True)
class Stats:
    n: int
    median_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats:
        ms = [s * 1000.0 for s in seconds]
        return cls(len(ms), statistics.median(ms), min(ms), max(ms))


@dataclass(frozen=True)
class Results:
    cold_api_ms: float
    api: Stats
    cli: Stats
    broken: Stats
    broken_failed: list[str]
    steps_ms: dict[str, float]

    def goals(self) -> list[tuple[str, float, float]]:
        return [("healthy diag, CLI median", self.cli.median_ms, GOAL_HEALTHY_CLI_S * 1000),
                ("broken diag, API median", self.broken.median_ms, GOAL_BROKEN_S * 1000)]

    def to_json(self) -> dict[str, Any]:
        return {"cold_api_ms": self.cold_api_ms, "api": asdict(self.api),
                "cli": asdict(self.cli), "broken": asdict(self.broken),
                "broken_failed": self.broken_failed, "steps_median_ms": self.steps_ms,
                "goals": [{"name": n, "value_ms": v, "limit_ms": lim, "pass": v <= lim}
                          for n, v, lim in self.goals()]}


def _dns_listening(sb: Sandbox) -> bool:
    answer = request(sb.state_dir, "status", timeout=2.0) or {}
    return any(e.get("Network") == NETWORK and e.get("State") == "listening"
               for e in answer.get("Dns", []))


def _timed_diag(sb: Sandbox, target: tuple[str, int]) -> tuple[float, dict[str, float]]:
    start = time.perf_counter()
    report = diagnose(sb.service, VM, target)
    took = time.perf_counter() - start
    if not report.ok:
        raise RuntimeError(f"the healthy VM did not pass: {report.summary()}")
    return took, {s.name: s.seconds for s in report.steps}


def bench_api(sb: Sandbox, target: tuple[str, int], runs: int) -> tuple[Stats, dict[str, float]]:
    walls: list[float] = []
    steps: dict[str, list[float]] = {name: [] for name in STEPS}
    for _ in range(runs):
        took, per_step = _timed_diag(sb, target)
        walls.append(took)
        for name, seconds in per_step.items():
            steps[name].append(seconds * 1000.0)
    return Stats.of(walls), {name: statistics.median(v) for name, v in steps.items()}


def bench_cli(sb: Sandbox, target: tuple[str, int], runs: int) -> Stats:
    walls: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        result = sb.hnsctl("diag", VM, "--target", f"{target[0]}:{target[1]}")
        walls.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise RuntimeError(f"hnsctl diag exited {result.returncode}: "
                               f"{result.stdout.strip()} {result.stderr.strip()}")
    return Stats.of(walls)


def bench_broken(sb: Sandbox, target: tuple[str, int], runs: int) -> tuple[Stats, list[str]]:
    """The network's bridge down: nothing answers the VM on the link, and each step that
    needs an answer waits its whole timeout."""
    bridge = sb.service.get_network(NETWORK).bridge
    subprocess.run(["ip", "-n", sb.host_netns, "link", "set", bridge, "down"], check=True)
    try:
        walls, failed = [], []
        for _ in range(runs):
            start = time.perf_counter()
            report = diagnose(sb.service, VM, target)
            walls.append(time.perf_counter() - start)
            failed = [s.name for s in report.steps if s.ok is False]
        return Stats.of(walls), failed
    finally:
        sb.service.restore()            # the bridge up again


def run(args: argparse.Namespace) -> Results:
    sb = Sandbox()
    daemon = None
    try:
        progress(f"sandbox {sb.host_netns}, state {sb.state_dir}")
        sb.service.create_network(NETWORK, "nat")
        sb.vm(VM, NETWORK)
        daemon = start_daemon(sb)
        listener = sb.outside.socket()
        listener.bind((sb.outside_ip, 0))
        listener.listen(1024)
        target = (sb.outside_ip, int(listener.getsockname()[1]))
        daemon.wait(lambda: _dns_listening(sb), "the daemon's DNS proxy")
        cold, _ = _timed_diag(sb, target)   # imports scapy's layers: not in the series
        progress(f"API: {args.runs} x diagnose()")
        api, steps = bench_api(sb, target, args.runs)
        progress(f"CLI: {args.runs} x hnsctl diag")
        cli = bench_cli(sb, target, args.runs)
        progress(f"broken: {args.broken_runs} x diagnose() with the bridge down")
        broken, failed = bench_broken(sb, target, args.broken_runs)
        listener.close()
        return Results(cold * 1000.0, api, cli, broken, failed, steps)
    finally:
        progress("closing the sandbox")
        if daemon is not None:
            daemon.stop()
        sb.close()


def print_table(r: Results) -> None:
    print(f"{'run':<34}{'n':>4}{'median':>10}{'min':>10}{'max':>10}   (ms)")
    for label, s in (("diagnose() healthy (API)", r.api), ("hnsctl diag healthy (CLI)", r.cli),
                     ("diagnose() broken: bridge down", r.broken)):
        print(f"{label:<34}{s.n:>4}{s.median_ms:>10.1f}{s.min_ms:>10.1f}{s.max_ms:>10.1f}")
    print(f"first diagnose() of the process (scapy's imports): {r.cold_api_ms:.1f} ms")
    print(f"broken run's failing steps: {', '.join(r.broken_failed) or 'none'}")
    print()
    print("healthy steps, median ms: " +
          ", ".join(f"{name} {ms:.1f}" for name, ms in r.steps_ms.items()))
    print()
    print(f"{'goal':<34}{'value':>12}{'limit':>12}  result")
    for name, value, limit in r.goals():
        print(f"{name:<34}{value:>9.0f} ms{'<= ' + f'{limit:.0f} ms':>12}  "
              f"{'PASS' if value <= limit else 'MISS'}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=positive_int, default=10,
                   help="healthy runs, API and CLI each (default %(default)s)")
    p.add_argument("--broken-runs", type=positive_int, default=3,
                   help="runs on the broken VM (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def report(results: Results) -> None:
        if args.json:
            print(json.dumps(results.to_json(), indent=2))
        else:
            print_table(results)
    return run_hermetic(lambda: run(args), report)


if __name__ == "__main__":
    sys.exit(main())
