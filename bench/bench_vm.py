"""Benchmark of VM creation and deletion in hns, hermetic: everything runs in a Sandbox.

What it measures, all on one NAT network ``bench`` made with ``create_network``:

1. one ``vm create`` and one ``vm delete`` through the Python API (``Service.create_vm`` /
   ``delete_vm``), repeated ``--trials`` times: median and p90;
2. the same through the CLI (``python -m hns.cli vm create|delete``, a subprocess each,
   so interpreter start-up and imports count), ``--cli-trials`` times;
3. ``--count`` VMs created one after the other on the network, each create timed: the
   mean of the first 10 against the mean of the last 10 (does creation slow down as the
   network fills?), then all of them deleted, each delete timed.

How: a :class:`hns.testing.sandbox.Sandbox` gives a namespace playing the host, one
playing the outside network and a private state directory, so nothing touches this
machine's own namespace or state; the sandbox is closed in a ``finally`` (also on Ctrl-C
or SIGTERM) and removes every namespace, link, nft table and resolv.conf it made.  One
untimed create/delete pair warms the service up first (thread, netlink socket).  Times
come from ``time.perf_counter``.

The goals are printed with PASS/MISS, not asserted: the exit status is 0 whether or not a
goal is met, 1 on an actual error, 130 on Ctrl-C.  ``--json`` prints the figures as one
JSON object on stdout instead of the table (progress still goes to stderr).
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

from harness import positive_int, progress, run_hermetic

from hns.service import Service
from hns.testing.sandbox import Sandbox

NETWORK = "bench"
GOAL_CREATE_MEDIAN_MS = 150.0
GOAL_SCALE_RATIO = 1.5
WINDOW = 10  # VMs at each end of the scale run that are compared


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


@dataclass(frozen=True)
class ScaleResult:
    count: int
    window: int
    first_mean_ms: float
    last_mean_ms: float
    ratio: float
    create: Stats
    delete: Stats


@dataclass(frozen=True)
class Goal:
    name: str
    value: float
    limit: float
    unit: str

    @property
    def passed(self) -> bool:
        return self.value <= self.limit


@dataclass(frozen=True)
class Results:
    api_create: Stats
    api_delete: Stats
    cli_create: Stats
    cli_delete: Stats
    scale: ScaleResult

    def goals(self) -> list[Goal]:
        return [
            Goal("vm create median (API)", self.api_create.median_ms, GOAL_CREATE_MEDIAN_MS,
                 "ms"),
            Goal(f"{self.scale.count}th-VM ratio (last {self.scale.window} / first "
                 f"{self.scale.window})", self.scale.ratio, GOAL_SCALE_RATIO, "x"),
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "api": {"create": asdict(self.api_create), "delete": asdict(self.api_delete)},
            "cli": {"create": asdict(self.cli_create), "delete": asdict(self.cli_delete)},
            "scale": asdict(self.scale),
            "goals": [{"name": g.name, "value": g.value, "limit": g.limit, "unit": g.unit,
                       "pass": g.passed} for g in self.goals()],
        }


def _timed(fn: Callable[..., object], *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _hnsctl(sandbox: Sandbox, *args: str) -> None:
    result = sandbox.hnsctl(*args)
    if result.returncode != 0:
        raise RuntimeError(f"hnsctl {' '.join(args)} exited {result.returncode}: "
                           f"{result.stderr.strip()}")


def bench_api(svc: Service, trials: int) -> tuple[Stats, Stats]:
    """Create and delete one VM ``trials`` times through the Python API."""
    creates: list[float] = []
    deletes: list[float] = []
    for i in range(trials):
        name = f"api{i}"
        creates.append(_timed(svc.create_vm, name, NETWORK))
        deletes.append(_timed(svc.delete_vm, name))
    return Stats.of(creates), Stats.of(deletes)


def bench_cli(sandbox: Sandbox, trials: int) -> tuple[Stats, Stats]:
    """Create and delete one VM ``trials`` times through ``hnsctl`` subprocesses."""
    creates: list[float] = []
    deletes: list[float] = []
    for i in range(trials):
        name = f"cli{i}"
        creates.append(_timed(_hnsctl, sandbox, "vm", "create", name, "--network", NETWORK))
        deletes.append(_timed(_hnsctl, sandbox, "vm", "delete", name))
    return Stats.of(creates), Stats.of(deletes)


def bench_scale(svc: Service, count: int) -> ScaleResult:
    """Create ``count`` VMs on the network, then delete them all; each step timed."""
    names = [f"scale{i:04d}" for i in range(count)]
    creates: list[float] = []
    for i, name in enumerate(names, 1):
        creates.append(_timed(svc.create_vm, name, NETWORK))
        if i % 50 == 0:
            progress(f"  {i}/{count} created, last {creates[-1] * 1000:.1f} ms")
    deletes: list[float] = []
    for name in names:
        deletes.append(_timed(svc.delete_vm, name))
    window = min(WINDOW, count // 2)
    first = statistics.fmean(creates[:window]) * 1000.0
    last = statistics.fmean(creates[-window:]) * 1000.0
    return ScaleResult(count=count, window=window, first_mean_ms=first, last_mean_ms=last,
                       ratio=last / first, create=Stats.of(creates), delete=Stats.of(deletes))


def run(args: argparse.Namespace) -> Results:
    sandbox = Sandbox()
    try:
        svc: Service = sandbox.service
        progress(f"sandbox {sandbox.host_netns}, state {sandbox.state_dir}")
        svc.create_network(NETWORK, "nat")
        svc.create_vm("warmup", NETWORK)  # thread and netlink socket, not timed
        svc.delete_vm("warmup")
        progress(f"API: {args.trials} x vm create + vm delete")
        api_create, api_delete = bench_api(svc, args.trials)
        progress(f"CLI: {args.cli_trials} x hnsctl vm create + vm delete")
        cli_create, cli_delete = bench_cli(sandbox, args.cli_trials)
        progress(f"scale: {args.count} VMs on one network")
        scale = bench_scale(svc, args.count)
        return Results(api_create, api_delete, cli_create, cli_delete, scale)
    finally:
        progress("closing the sandbox")
        sandbox.close()


def _stats_row(label: str, s: Stats) -> str:
    return (f"{label:<24}{s.n:>5}{s.median_ms:>10.1f}{s.p90_ms:>10.1f}{s.mean_ms:>10.1f}"
            f"{s.min_ms:>10.1f}{s.max_ms:>10.1f}")


def print_table(r: Results) -> None:
    print(f"{'operation':<24}{'n':>5}{'median':>10}{'p90':>10}{'mean':>10}{'min':>10}"
          f"{'max':>10}   (ms)")
    print(_stats_row("vm create (API)", r.api_create))
    print(_stats_row("vm delete (API)", r.api_delete))
    print(_stats_row("vm create (CLI)", r.cli_create))
    print(_stats_row("vm delete (CLI)", r.cli_delete))
    print(_stats_row(f"vm create ({r.scale.count} VMs)", r.scale.create))
    print(_stats_row(f"vm delete ({r.scale.count} VMs)", r.scale.delete))
    s = r.scale
    print()
    print(f"{s.count} VMs: create mean first {s.window} {s.first_mean_ms:.1f} ms, "
          f"last {s.window} {s.last_mean_ms:.1f} ms, ratio {s.ratio:.2f}; "
          f"delete mean {s.delete.mean_ms:.1f} ms")
    print()
    print(f"{'goal':<40}{'value':>10}{'limit':>10}  result")
    for g in r.goals():
        value = f"{g.value:.1f} {g.unit}" if g.unit == "ms" else f"{g.value:.2f}{g.unit}"
        limit = f"{g.limit:.0f} {g.unit}" if g.unit == "ms" else f"{g.limit:.2f}{g.unit}"
        print(f"{g.name:<40}{value:>10}{'<= ' + limit:>10}  {'PASS' if g.passed else 'MISS'}")


def _at_least_two(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("must be at least 2 (a first and a last window)")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--trials", type=positive_int, default=30,
                   help="API create/delete pairs (default %(default)s)")
    p.add_argument("--cli-trials", type=positive_int, default=15,
                   help="CLI create/delete pairs (default %(default)s)")
    p.add_argument("--count", type=_at_least_two, default=200,
                   help="VMs on one network in the scale run (default %(default)s)")
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
