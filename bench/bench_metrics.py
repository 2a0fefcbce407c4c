"""Benchmark of the daemon's counters: what counting costs the relay, and what a scrape
costs.  Hermetic: everything in a Sandbox.

The relay is measured three ways in one run, each in its own process in the host
namespace, clients (iperf3, this script's short-connection client) in the outside
namespace, the servers in a VM -- the set-up of bench_relay.py:

* **before**: the relay engine as it was before the counters (``portproxy`` of commit
  ``--baseline``, extracted with ``git archive`` into a temporary directory first on the
  engine's ``sys.path``; the role checks that the engine it runs has no byte counters);
* **counting**: the engine of this checkout, counters on (they always are);
* **scraped**: the same, with the counters of every relay read ten times a second on
  the engine thread, as a scrape does.

Rounds run the ways back to back, each way first in turn; a goal is the median of the
rounds' ratios.  Then the scrape: a daemon with ``--relays`` static proxies and
``--metrics``, curl in the host namespace fetching ``/metrics`` ``--scrapes`` times
(median and range of the wall time, and the size).
Goals (printed, not asserted): counting and scraped >= 0.97x before, throughput and
connection rate.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from bench_relay import (
    ECHO,
    IPERF,
    _hostport,
    _must,
    _ready,
    client_rate,
    iperf_gbps,
    wait_listening,
)
from harness import positive_int, progress, run_hermetic, start_daemon

NETWORK = "bench"
WAYS = {"before": 11000, "counting": 12000, "scraped": 13000}   # port = base + target
GOAL = 0.97
METRICS_PORT = 9464
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the engine role --------------------------------------------------------------------


def role_engine(args: argparse.Namespace) -> int:
    """A relay engine for ``--tcp LISTEN=CONNECT`` specs; ``--scrape`` reads every
    relay's counters ten times a second on the engine thread."""
    from portproxy.engine import Engine
    engine = Engine()
    for spec in args.tcp:
        listen, connect = (_hostport(part) for part in spec.split("="))
        engine.add_tcp(socket.create_server(listen, backlog=4096), connect, name=spec)
    counting = hasattr(engine.relays()[0], "bytes_up")
    if counting != args.expect_counters:
        print(f"engine from {sys.modules['portproxy'].__file__}: counters {counting}, "
              f"expected {args.expect_counters}", file=sys.stderr)
        return 1
    stop = threading.Event()
    if args.scrape:
        def scrape() -> None:
            while not stop.wait(0.1):
                engine.call_soon_threadsafe(engine.relays)
        threading.Thread(target=scrape, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: engine.stop())
    print("ready", flush=True)
    engine.run()
    stop.set()
    engine.close()
    return 0


def role_client(args: argparse.Namespace) -> int:
    print(json.dumps(client_rate(args.host, args.port, args.count, args.concurrency)))
    return 0


# -- the benchmark ----------------------------------------------------------------------


@dataclass
class Results:
    iperf: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # way -> P -> runs
    rate: dict[str, list[float]] = field(default_factory=dict)              # way -> runs
    scrape_ms: list[float] = field(default_factory=list)
    scrape_bytes: int = 0
    relays: int = 0
    cpu_per_gb: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # s per GB
    cpu_per_kconn: dict[str, list[float]] = field(default_factory=dict)  # s per 1000 conns
    notes: list[str] = field(default_factory=list)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process (every thread), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _me(*args: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), *args]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from hns.testing.sandbox import Sandbox
        self.args = args
        self.sandbox = Sandbox()
        self.results = Results()
        self.baseline = tempfile.mkdtemp(prefix="hns-bench-baseline-")
        self.pids: dict[str, int] = {}

    def setup(self) -> None:
        sb = self.sandbox
        archive = subprocess.run(["git", "-C", REPO, "archive", self.args.baseline,
                                  "portproxy"], capture_output=True, check=False)
        if archive.returncode != 0:
            raise RuntimeError(f"git archive {self.args.baseline}: "
                               f"{archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", self.baseline], input=archive.stdout, check=True)
        sb.service.create_network(NETWORK, "nat", firewall=False)
        self.vm = sb.vm("srv", NETWORK)
        for peer in (sb.host, sb.outside):
            _must(peer.run(["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=10000 65000",
                            "net.ipv4.tcp_tw_reuse=1"]))
        self.vm.popen(["iperf3", "-s", "-p", str(IPERF)], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
        bench_relay = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_relay.py")
        _ready(self.vm.popen([sys.executable, bench_relay, "--role", "echo", "--port",
                              str(ECHO)], stdin=subprocess.DEVNULL))
        wait_listening(self.vm, IPERF)
        for way, base in WAYS.items():
            specs = [f"--tcp={sb.uplink_ip}:{base + t}={self.vm.ip}:{t}" for t in (IPERF, ECHO)]
            extra = ["--scrape"] if way == "scraped" else []
            env = dict(os.environ)
            if way == "before":
                env["PYTHONPATH"] = self.baseline
            else:
                extra.append("--expect-counters")
            proc = sb.host.popen(_me("--role", "engine", *specs, *extra),
                                 stdin=subprocess.DEVNULL, env=env)
            _ready(proc)
            self.pids[way] = proc.pid      # ip netns exec execs: the engine itself

    def relay_runs(self) -> None:
        sb = self.sandbox
        ways = list(WAYS.items())
        for round_ in range(self.args.runs):
            # each way takes each place in a round in turn: the first of a round runs
            # on a cooler machine, or a warmer one
            shift = round_ % len(ways)
            for way, base in ways[shift:] + ways[:shift]:
                progress(f"{way} ({round_ + 1}/{self.args.runs})")
                for streams in (1, 4):
                    cpu = cpu_seconds(self.pids[way])
                    gbps = iperf_gbps(sb.outside, sb.uplink_ip, base + IPERF, streams,
                                      self.args.seconds)
                    cpu = cpu_seconds(self.pids[way]) - cpu
                    self.results.iperf.setdefault(way, {}).setdefault(
                        f"P{streams}", []).append(gbps)
                    gigabytes = gbps / 8 * (self.args.seconds + 1)     # -O 1: one more
                    self.results.cpu_per_gb.setdefault(way, {}).setdefault(
                        f"P{streams}", []).append(cpu / gigabytes)
                cpu = cpu_seconds(self.pids[way])
                result = sb.outside.run(_me("--role", "client", "--host", sb.uplink_ip,
                                            "--port", str(base + ECHO), "--count",
                                            str(self.args.conns), "--concurrency", "50"),
                                        timeout=600)
                _must(result)
                rate = json.loads(result.stdout.strip().splitlines()[-1])["per_s"]
                self.results.rate.setdefault(way, []).append(float(rate))
                self.results.cpu_per_kconn.setdefault(way, []).append(
                    (cpu_seconds(self.pids[way]) - cpu) / self.args.conns * 1000)

    def scrapes(self) -> None:
        from hns.daemon.config import ProxyConfig
        from hns.daemon.netsh import parse_add
        sb = self.sandbox
        config = ProxyConfig(sb.service.store)
        for i in range(self.args.relays):
            config.add(parse_add("v4tov4", [f"listenport={30000 + i}",
                                            f"connectaddress={self.vm.ip}",
                                            f"connectport={ECHO}"]))
        daemon = start_daemon(sb, "--metrics", str(METRICS_PORT))
        try:
            def listening() -> bool:
                answer = sb.hnsctl("--json", "status")
                relays = json.loads(answer.stdout).get("Relays", [])
                return bool(sum(r["State"] == "listening" for r in relays) == self.args.relays)
            daemon.wait(listening, f"{self.args.relays} proxies listening", timeout=120)
            url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
            for _ in range(self.args.scrapes):
                result = sb.host.run(["curl", "-sS", "-o", "/dev/null", "-w",
                                      "%{time_total} %{size_download}", url])
                _must(result)
                seconds, size = result.stdout.split()
                self.results.scrape_ms.append(float(seconds) * 1000)
                self.results.scrape_bytes = int(size)
            self.results.relays = self.args.relays
        finally:
            daemon.stop()

    def close(self) -> None:
        self.sandbox.close()
        subprocess.run(["rm", "-rf", self.baseline], check=False)


def run(args: argparse.Namespace) -> Results:
    bench = Bench(args)
    try:
        progress(f"sandbox {bench.sandbox.host_netns}")
        load = os.getloadavg()[0]
        bench.setup()
        if "relay" in args.steps:
            bench.relay_runs()
        if "scrape" in args.steps:
            bench.scrapes()
        bench.results.notes.append(
            f"load average (1 min) {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
            f"end, on {os.cpu_count()} CPUs")
        return bench.results
    finally:
        progress("closing the sandbox")
        bench.close()


# -- output -----------------------------------------------------------------------------


def paired(values: list[float], baseline: list[float]) -> list[float]:
    """The ratio of each round (the ways of a round ran back to back)."""
    return [v / b for v, b in zip(values, baseline, strict=True)]


def goals(r: Results) -> list[tuple[str, float, bool]]:
    """Median of the rounds' ratios: a round compares like with like on a busy machine."""
    out = []
    for way in ("counting", "scraped"):
        if way not in r.iperf:
            continue
        for p in ("P1", "P4"):
            ratio = statistics.median(paired(r.iperf[way][p], r.iperf["before"][p]))
            out.append((f"{way} / before, throughput {p}", ratio, ratio >= GOAL))
        ratio = statistics.median(paired(r.rate[way], r.rate["before"]))
        out.append((f"{way} / before, connection rate", ratio, ratio >= GOAL))
    return out


def _cell(values: list[float], digits: int) -> str:
    return (f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-"
            f"{max(values):.{digits}f}]")


def report(r: Results, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(asdict(r) | {"goals": goals(r)}, indent=2))
        return
    if r.iperf:
        print(f"relay, clients in the outside namespace; median [range] of {args.runs} "
              f"rounds (baseline: portproxy of {args.baseline})")
        print(f"  {'way':<10}{'iperf3 -P 1 Gbit/s':>24}{'iperf3 -P 4 Gbit/s':>24}"
              f"{'conn/s (50 at once)':>26}")
        for way in WAYS:
            print(f"  {way:<10}{_cell(r.iperf[way]['P1'], 2):>24}"
                  f"{_cell(r.iperf[way]['P4'], 2):>24}{_cell(r.rate[way], 0):>26}")
        for way in ("counting", "scraped"):
            rounds = "; ".join(
                f"{what} " + " ".join(f"{x:.2f}" for x in paired(values, base))
                for what, values, base in (
                    ("-P 1", r.iperf[way]["P1"], r.iperf["before"]["P1"]),
                    ("-P 4", r.iperf[way]["P4"], r.iperf["before"]["P4"]),
                    ("conn/s", r.rate[way], r.rate["before"])))
            print(f"  {way} / before, each round: {rounds}")
        print("  engine CPU, median [range]: s per GB relayed (-P 1, -P 4), s per 1000 "
              "connections")
        for way in WAYS:
            print(f"  {way:<10}{_cell(r.cpu_per_gb[way]['P1'], 3):>24}"
                  f"{_cell(r.cpu_per_gb[way]['P4'], 3):>24}"
                  f"{_cell(r.cpu_per_kconn[way], 3):>26}")
    if r.scrape_ms:
        print(f"\nscrape of /metrics with {r.relays} static proxies ({len(r.scrape_ms)} "
              f"scrapes, {r.scrape_bytes} bytes): {_cell(r.scrape_ms, 1)} ms")
    for note in r.notes:
        print(f"note: {note}")
    print(f"\n{'goal':<44}{'value':>8}  limit    result")
    for name, value, passed in goals(r):
        print(f"{name:<44}{value:>8.3f}  >= {GOAL}  {'PASS' if passed else 'MISS'}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seconds", type=positive_int, default=4, help="iperf3 -t")
    p.add_argument("--runs", type=positive_int, default=6, help="rounds of every way")
    p.add_argument("--conns", type=positive_int, default=3000,
                   help="short connections per rate run")
    p.add_argument("--relays", type=positive_int, default=200,
                   help="static proxies of the scraped daemon")
    p.add_argument("--scrapes", type=positive_int, default=20, help="scrapes timed")
    p.add_argument("--baseline", default="ad2d56c",
                   help="the commit whose relay engine had no counters")
    p.add_argument("--steps", nargs="+", choices=("relay", "scrape"),
                   default=["relay", "scrape"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--role", choices=("bench", "engine", "client"), default="bench",
                   help=argparse.SUPPRESS)
    p.add_argument("--tcp", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--scrape", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--expect-counters", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--host", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=50, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "engine":
        return role_engine(args)
    if args.role == "client":
        return role_client(args)
    return run_hermetic(lambda: run(args), lambda r: report(r, args),
                        tools=("iperf3", "curl", "git"))


if __name__ == "__main__":
    sys.exit(main())

