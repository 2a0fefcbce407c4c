"""Benchmark of the kernel data path against the relay, pasta and socat, hermetic.

Every way runs in each of ``--rounds`` rounds, in an order rotated from round to round
(the machine drifts; a per-round ratio compares runs made seconds apart): iperf3 (``-t
--seconds``, ``-O 1``, receiver's rate), one stream and four.

1. localhost forwarding, client in the host namespace, an iperf3 in a NAT VM on 0.0.0.0:
   ``direct`` the VM's own address (the baseline); ``kernel`` 127.0.0.1, the daemon in
   its default mode (``--localhost-path auto``: a DNAT element of its fast table);
   ``relay`` 127.0.0.1 in a second sandbox, daemon ``--localhost-path relay``; ``pasta``
   127.0.0.1, pasta as root forwarding into a namespace of its own (its own iperf3);
   ``socat`` TCP-LISTEN on 127.0.0.1 to the VM's address.
2. static port proxies, client in the outside namespace, to the uplink address (isolation
   keeps the outside from the VM's address: no direct way): ``portmap`` a kernel port
   mapping (the baseline), ``kernel`` and ``relay`` ``hnsctl portproxy add v4tov4 ...
   mode=kernel|relay``; and the connection rate through each (``--conns`` short
   connections, 16 bytes each way, one at a time and ``--concurrency`` at once: the
   client and echo server of bench_relay).

Each way has its own iperf3 server (one that hangs is restarted).  The path a way took
is checked in ``hnsctl status --json`` (``Path`` of its ``Forwards``/``Relays`` row,
before and after the runs) and by its relay's byte counters (a kernel way's relay moves
nothing, a relay way's does).  A way that cannot be set up, or fails twice, is
reported failed and the others go on.  Everything (sandboxes, pasta's namespace,
processes by pid) is removed in a ``finally``, also on Ctrl-C or SIGTERM.  Goals are
printed, not asserted: exit 0 met or not, 1 on an error, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from bench_relay import MESSAGE, _exchange, _must, iperf_gbps, wait_listening
from harness import Daemon, positive_int, progress, run_hermetic, start_daemon, wait_until

from hns.daemon.control import request
from hns.kernel import kill_netns_processes
from hns.netns import create_netns, delete_netns, netns_exists, netns_path, run_in_netns
from hns.testing.sandbox import Peer, Sandbox, SandboxVm

NETWORK = "bench"
BENCH_RELAY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_relay.py")
ECHO = 7000                      # the echo server in the VM (connection rate)
SOCAT_PORT, PASTA_PORT = 15203, 16201
PROXY_BASE = {"portmap": 20000, "kernel": 21000, "relay": 22000}  # + 201 iperf3, + 700 echo
VM_PORTS = {"localhost:direct": 5201, "localhost:kernel": 5202,   # iperf3 servers in the VM
            "localhost:socat": 5203, "proxy:portmap": 5204, "proxy:kernel": 5205,
            "proxy:relay": 5206, "localhost:relay": 5201, "localhost:pasta": PASTA_PORT}
GOAL_KERNEL = 0.95
GOAL_RATE = 2.0
STREAMS = (1, 4)
QUICK = {"rounds": 2, "seconds": 2, "conns": 300}
FULL = {"rounds": 5, "seconds": 5, "conns": 2000}


@dataclass
class Way:
    key: str                      # "localhost:kernel"
    client: Peer                  # where its client runs
    host: str
    port: int
    server: Peer                  # where its iperf3 server runs (port: VM_PORTS[key])
    want: str | None = None       # the Path its status row should show
    row: Callable[[], dict[str, Any] | None] | None = None
    echo_port: int | None = None  # connection rate through the same way
    error: str | None = None
    rate_error: str | None = None
    failures: int = 0
    proc: subprocess.Popen[str] | None = field(default=None, repr=False)


@dataclass
class Results:
    iperf: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    rate: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    paths: dict[str, dict[str, Any]] = field(default_factory=dict)  # way -> want/status/MB
    failed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def status_row(sb: Sandbox, section: str, port: int) -> Callable[[], dict[str, Any] | None]:
    """A status row: IPv4 TCP forward of a VM port (``Forwards``) or proxy (``Relays``)."""
    def row() -> dict[str, Any] | None:
        answer = request(sb.state_dir, "status", timeout=2.0) or {}
        return next((r for r in answer.get(section, []) if r.get("Protocol") == "tcp"
                     and str(r.get("Listen", "")).endswith(f":{port}")
                     and r.get("Family", "ipv4") == "ipv4"), None)
    return row


def rotated(items: Sequence[Way], shift: int) -> list[Way]:
    return [*items[shift % len(items):], *items[:shift % len(items)]]


def paired(a: Sequence[float | None], b: Sequence[float | None]) -> list[float]:
    """Per-round ratios a / b of the rounds where both were measured."""
    return [x / y for x, y in zip(a, b, strict=False) if x is not None and y]


def span(values: Sequence[float | None], digits: int = 2, unit: str = "") -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "failed"
    return (f"{statistics.median(got):.{digits}f}{unit} [{min(got):.{digits}f}-"
            f"{max(got):.{digits}f}]")


def probe(host: str, port: int, echo: bool) -> None:
    """One connection (to an echo server: one exchange); OSError if it does not work."""
    with socket.create_connection((host, port), timeout=3.0) as sock:
        if echo:
            _exchange(sock, MESSAGE)


class Bench:
    """Two sandboxes (their daemons: auto, relay), pasta's namespace, servers and ways."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results = Results()
        self.ways: list[Way] = []
        self.daemons: list[Daemon] = []
        self.pasta: subprocess.Popen[str] | None = None
        self.pasta_ns: str | None = None
        self.auto = Sandbox()
        self.relay: Sandbox | None = None
        self.pasta_peer = Peer(f"{self.auto.prefix}{self.auto.tag}-pasta")

    def setup(self) -> None:
        progress(f"sandboxes: {self.auto.host_netns} (daemon auto), then one for the relay")
        self.ways = ways = self.setup_auto()
        self.relay = Sandbox()
        ways.insert(2, self.setup_relay())
        ways.insert(3, self.attempt(Way("localhost:pasta", self.auto.host, "127.0.0.1",
                                        PASTA_PORT, self.pasta_peer), self.setup_pasta))
        for way in ways:
            self.attempt(way, partial(self.start_server, way))
        for way in ways:
            self.attempt(way, partial(self.check_way, way))
        self.results.failed = {w.key: w.error for w in ways if w.error}

    def attempt(self, way: Way, action: Callable[[], object]) -> Way:
        """Run a step of a way's setup; an error marks the way failed, not the run."""
        if way.error is None:
            try:
                action()
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                way.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                progress(f"{way.key}: failed: {way.error}")
        return way

    def daemon(self, sb: Sandbox, path: str) -> Daemon:
        """Its daemon with ``--localhost-path PATH`` (refused: without it, and a note)."""
        try:
            daemon = start_daemon(sb, "--localhost-path", path)
        except RuntimeError as exc:
            if "exit 2" not in str(exc):
                raise
            self.results.notes.append(f"--localhost-path {path} refused ({exc}): that "
                                      "daemon runs without it")
            daemon = start_daemon(sb)
        self.daemons.append(daemon)
        return daemon

    def network(self, sb: Sandbox) -> SandboxVm:
        for peer in (sb.host, sb.outside):
            _must(peer.run(["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=10000 65000",
                            "net.ipv4.tcp_tw_reuse=1"]))
        sb.service.create_network(NETWORK, "nat")
        return sb.vm("srv", NETWORK)

    def setup_auto(self) -> list[Way]:
        sb = self.auto
        vm = self.network(sb)
        self.daemon(sb, "auto")
        ways = [Way("localhost:direct", sb.host, vm.ip, VM_PORTS["localhost:direct"], vm),
                Way("localhost:kernel", sb.host, "127.0.0.1", VM_PORTS["localhost:kernel"], vm,
                    want="kernel", row=status_row(sb, "Forwards", VM_PORTS["localhost:kernel"])),
                Way("localhost:socat", sb.host, "127.0.0.1", SOCAT_PORT, vm)]
        for mode, base in PROXY_BASE.items():
            ways.append(Way(f"proxy:{mode}", sb.outside, sb.uplink_ip, base + 201, vm,
                            echo_port=base + 700, want=None if mode == "portmap" else mode,
                            row=None if mode == "portmap" else status_row(sb, "Relays",
                                                                          base + 201)))
        echo = vm.popen([sys.executable, BENCH_RELAY, "--role", "echo", "--port",
                         str(ECHO)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.attempt(ways[2], lambda: sb.host.popen(
            ["socat", f"TCP-LISTEN:{SOCAT_PORT},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
             f"TCP:{vm.ip}:{VM_PORTS['localhost:socat']}"], stdin=subprocess.DEVNULL))
        for way in ways[3:]:
            self.attempt(way, partial(self.ports, vm, way))
        wait_listening(vm, ECHO)
        if echo.poll() is not None:
            raise RuntimeError("the echo server exited")
        return ways

    def ports(self, vm: SandboxVm, way: Way) -> None:
        """A ``proxy:`` way's port mappings or proxies to the VM's iperf3 and echo servers;
        ``mode=relay`` refused: without it (the relay was then the only path)."""
        mode = way.key.split(":")[1]
        for listen, target in ((way.port, VM_PORTS[way.key]), (way.echo_port, ECHO)):
            words = ["portproxy", "add", "v4tov4", f"listenport={listen}",
                     f"connectaddress={vm.ip}", f"connectport={target}", f"mode={mode}"]
            if mode == "portmap":
                words = ["portmap", "add", vm.name, "--protocol", "tcp", "--external-port",
                         str(listen), "--internal-port", str(target)]
            result = self.auto.hnsctl(*words)
            if result.returncode == 2 and mode == "relay":
                self.results.notes.append(f"mode=relay refused ({result.stderr.strip()}): "
                                          "the proxy is added without mode=")
                result = self.auto.hnsctl(*words[:-1])
            if result.returncode != 0:
                raise RuntimeError(f"hnsctl {' '.join(words[:2])} ... {words[-1]}: exit "
                                   f"{result.returncode}: {result.stderr.strip()}")

    def setup_relay(self) -> Way:
        assert self.relay is not None
        vm = self.network(self.relay)
        port = VM_PORTS["localhost:relay"]
        way = Way("localhost:relay", self.relay.host, "127.0.0.1", port, vm, want="relay",
                  row=status_row(self.relay, "Forwards", port))
        return self.attempt(way, partial(self.daemon, self.relay, "relay"))

    def setup_pasta(self) -> None:
        """pasta in the host namespace, as root, into a namespace of this benchmark's,
        which the sandbox's owner record names (a killed run's is removed with it)."""
        if shutil.which("pasta") is None:
            raise RuntimeError("pasta is missing (Debian: passt)")
        sb, ns = self.auto, self.pasta_peer.netns
        sb._write_record(netns=(sb.host_netns, sb.outside_netns, ns))
        create_netns(ns)
        self.pasta_ns = ns
        _must(self.pasta_peer.run(["ip", "link", "set", "lo", "up"]))
        # -f: stay in the foreground (our pid); -u/-T/-U none: only the one TCP port
        self.pasta = sb.host.popen(
            ["pasta", "--runas", "0:0", "--foreground", "--quiet", "--netns", netns_path(ns),
             "--netns-only", "--config-net", "-t", str(PASTA_PORT), "-u", "none",
             "-T", "none", "-U", "none"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        wait_listening(sb.host, PASTA_PORT)

    def start_server(self, way: Way) -> None:
        way.proc = way.server.popen(
            ["iperf3", "-s", "-B", "0.0.0.0", "-p", str(VM_PORTS[way.key])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(way.server, VM_PORTS[way.key])

    def check_way(self, way: Way) -> None:
        """Its relay row ready (its Path noted); one connection through it, and one
        exchange through its echo port."""
        if (row := way.row) is not None:
            wait_until(lambda: (row() or {}).get("State") in ("forwarding", "listening"),
                       f"{way.key} to serve")
            self.results.paths[way.key] = {"want": way.want, "status": (row() or {}).get("Path")}
        ns = way.client.netns
        wait_until(lambda: run_in_netns(ns, probe, way.host, way.port, False) is None,
                   f"a connection through {way.key}", timeout=10.0)
        if way.echo_port is not None:
            try:
                run_in_netns(ns, probe, way.host, way.echo_port, True)
            except OSError as exc:
                way.rate_error = f"echo through {way.key}: {exc}"

    def throughput(self) -> None:
        for r in range(self.args.rounds):
            for streams in STREAMS:
                for way in rotated(self.ways, r):
                    progress(f"iperf3 -P {streams} {way.key} ({r + 1}/{self.args.rounds})")
                    self.results.iperf.setdefault(way.key, {}).setdefault(
                        f"P{streams}", []).append(self.iperf(way, streams, self.args.seconds))

    def iperf(self, way: Way, streams: int, seconds: int) -> float | None:
        """One run, None if the way failed; a hung server is restarted; two failures
        and the way is given up."""
        if way.error is not None or way.failures >= 2:
            return None
        try:
            return iperf_gbps(way.client, way.host, way.port, streams, seconds)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            way.failures += 1
            why = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            self.results.failed.setdefault(way.key, why)
            self.results.notes.append(f"{way.key} -P {streams}: {why}")
            if way.proc is not None:
                way.proc.kill()
                way.proc.wait(10)
                self.attempt(way, partial(self.start_server, way))
            return None

    def connection_rate(self) -> None:
        ways = [w for w in self.ways if w.echo_port is not None]
        for r in range(self.args.rounds):
            for conc in (1, self.args.concurrency):
                for way in rotated(ways, r):
                    progress(f"{self.args.conns} connections, {conc} at a time, {way.key} "
                             f"({r + 1}/{self.args.rounds})")
                    self.results.rate.setdefault(way.key, {}).setdefault(
                        f"c{conc}", []).append(self.rate(way, conc))

    def rate(self, way: Way, conc: int) -> float | None:
        if way.rate_error is not None or way.error is not None or way.echo_port is None:
            self.results.failed.setdefault(f"{way.key} rate", str(way.rate_error or way.error))
            return None
        argv = [sys.executable, BENCH_RELAY, "--role", "client", "--mode", "rate", "--host",
                way.host, "--port", str(way.echo_port), "--count", str(self.args.conns),
                "--concurrency", str(conc)]
        try:
            result = way.client.run(argv, timeout=max(120, self.args.conns // 10))
            if result.returncode != 0:
                raise RuntimeError(result.stderr.strip()[-300:])
        except (subprocess.TimeoutExpired, RuntimeError) as exc:
            way.rate_error = f"the rate client: {exc}"
            return None
        got = json.loads(result.stdout.strip().splitlines()[-1])
        if got["errors"]:
            self.results.notes.append(f"rate {way.key} c{conc}: {got['errors']:.0f} errors")
        return float(got["per_s"])

    def relay_bytes(self) -> None:
        """Each way's Path after the runs and what its relay moved (a kernel way's:
        nothing), from its status row."""
        for way in self.ways:
            if way.row is not None and way.key in self.results.paths:
                row = way.row() or {}
                moved = int(row.get("BytesUp", 0)) + int(row.get("BytesDown", 0))
                self.results.paths[way.key].update(relay_mb=moved / 1e6,
                                                   status_end=row.get("Path"))

    def close(self) -> None:
        """Everything, in reverse order; every step runs even if one before fails."""
        with contextlib.ExitStack() as stack:
            for sb in (self.auto, self.relay):
                if sb is not None:
                    stack.callback(sb.close)
            for daemon in self.daemons:
                stack.callback(daemon.stop)
            stack.callback(self.close_pasta)

    def close_pasta(self) -> None:
        if self.pasta is not None and self.pasta.poll() is None:
            self.pasta.kill()
            self.pasta.wait(10)
        if self.pasta_ns is None:
            return
        self.pasta_peer.stop_processes()
        kill_netns_processes(self.pasta_ns)
        delete_netns(self.pasta_ns)
        if netns_exists(self.pasta_ns):
            raise RuntimeError(f"netns {self.pasta_ns} left behind")


def run(args: argparse.Namespace) -> Results:
    bench = Bench(args)
    try:
        load = os.getloadavg()[0]
        bench.setup()
        bench.throughput()
        bench.connection_rate()
        bench.relay_bytes()
        bench.results.notes.append(
            f"load average (1 min) {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
            f"end, on {os.cpu_count()} CPUs: anything else running skews the figures")
        return bench.results
    finally:
        progress("closing the sandboxes")
        bench.close()


# -- output ----------------------------------------------------------------------------


def path_problem(r: Results, way: str) -> str | None:
    """Why a way's figures are not of the path it stands for, or None."""
    seen = r.paths.get(way)
    if seen is None:
        return None
    for when in ("status", "status_end"):
        if seen.get(when) not in (None, seen["want"]):
            return f"path {seen[when]}, not {seen['want']}"
    moved = seen.get("relay_mb")
    if moved is not None and seen["want"] == "kernel" and moved > 1.0:
        return f"its relay moved {moved:.0f} MB"
    if moved is not None and seen["want"] == "relay" and moved < 1.0:
        return "its relay moved nothing"
    return None


def goals(r: Results) -> list[tuple[str, float | None, str, str]]:
    """(name, value, limit, PASS | MISS | n/a ...): medians of per-round ratios."""
    checks = [(f"{a.replace(':', ' ')} / {b.split(':')[1]}, -P {p}", r.iperf, a, b, f"P{p}",
               limit) for a, b, limit in (("localhost:kernel", "localhost:direct", GOAL_KERNEL),
                                          ("localhost:kernel", "localhost:pasta", 1.0),
                                          ("proxy:kernel", "proxy:portmap", GOAL_KERNEL))
              for p in STREAMS]
    checks += [(f"conn rate proxy kernel / relay, {c}", r.rate, "proxy:kernel", "proxy:relay",
                c, GOAL_RATE) for c in r.rate.get("proxy:kernel", {})]
    out: list[tuple[str, float | None, str, str]] = []
    for name, table, a, b, sub, limit in checks:
        ratios = paired(table.get(a, {}).get(sub, []), table.get(b, {}).get(sub, []))
        text = f"> {limit:g}x" if limit == 1.0 else f">= {limit:g}x"
        if not ratios:
            out.append((name, None, text, "n/a (a way failed)"))
            continue
        value = statistics.median(ratios)
        met = value > limit if limit == 1.0 else value >= limit
        problem = path_problem(r, a) or path_problem(r, b)
        out.append((name, value, text, f"MISS ({problem})" if problem else
                    "PASS" if met else "MISS"))
    return out


def ratio(r: Results, a: str, b: str, key: str) -> str:
    return span(paired(r.iperf.get(a, {}).get(key, []), r.iperf.get(b, {}).get(key, [])),
                unit="x")


def print_part(r: Results, part: str, base: str, versus: Sequence[str]) -> None:
    print(f"  {'way':<9}{'path':<9}" + "".join(
        f"{f'-P {p}: Gbit/s':<22}{'x ' + base:<20}" for p in STREAMS))
    for way, by_p in r.iperf.items():
        if way.startswith(part):
            seen = r.paths.get(way, {})
            print(f"  {way.split(':')[1]:<9}{seen.get('status') or '-':<9}" + "".join(
                f"{span(by_p[f'P{p}']):<22}{ratio(r, way, f'{part}:{base}', f'P{p}'):<20}"
                for p in STREAMS))
    for other in versus:
        print(f"  kernel / {other}: " + "   ".join(
            f"-P {p}: {ratio(r, f'{part}:kernel', f'{part}:{other}', f'P{p}')}"
            for p in STREAMS))


def print_table(r: Results, args: argparse.Namespace) -> None:
    print(f"iperf3 -t {args.seconds} -O 1, receiver's rate, median [min-max] of "
          f"{args.rounds} rounds; ratios: per round, paired, median [min-max]")
    print("\n1. localhost forwarding: host namespace -> 127.0.0.1 (direct: the VM's address)")
    print_part(r, "localhost", "direct", ("relay", "pasta"))
    print("\n2. static port proxy: outside namespace -> uplink address (baseline: the "
          "kernel port mapping)")
    print_part(r, "proxy", "portmap", ("relay",))
    print(f"\nconnection rate, outside -> uplink ({args.conns} short connections; conn/s, "
          "median [min-max])")
    for way, by_c in r.rate.items():
        print(f"  {way.split(':')[1]:<9}" + "".join(
            f"{c:>5}: {span(v, 0):<22}" for c, v in by_c.items()))
    print("\npath check (hnsctl status --json: Path; MB the way's relay moved)")
    for way, seen in r.paths.items():
        moved = seen.get("relay_mb")
        print(f"  {way:<18} want {seen['want']:<7} status {seen.get('status') or '?':<7}"
              f" relay moved {'?' if moved is None else f'{moved:.0f} MB':<10} "
              f"{path_problem(r, way) or 'ok'}")
    for way, why in r.failed.items():
        print(f"failed: {way}: {why}")
    for note in dict.fromkeys(r.notes):
        print(f"note: {note}")
    print(f"\n{'goal':<42}{'value':>8}  {'limit':<9}result")
    for name, value, limit, result in goals(r):
        print(f"{name:<42}{'-' if value is None else f'{value:.2f}':>8}  {limit:<9}{result}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    for key, what in (("rounds", "rounds, every way once in each"), ("seconds", "iperf3 -t"),
                      ("conns", "short connections per rate run")):
        p.add_argument(f"--{key}", type=positive_int,
                       help=f"{what} (default {FULL[key]}; --quick {QUICK[key]})")
    p.add_argument("--concurrency", type=positive_int, default=16,
                   help="connections at once in the second rate run (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def report(results: Results) -> None:
        if args.json:
            print(json.dumps(asdict(results) | {"goals": goals(results)}, indent=2))
        else:
            print_table(results, args)
    return run_hermetic(lambda: run(args), report, tools=("iperf3", "socat"))


if __name__ == "__main__":
    sys.exit(main())
