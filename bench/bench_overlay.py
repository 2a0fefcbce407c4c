"""Benchmark of overlay networks (docs/overlay.md), hermetic: a cluster of emulated hosts.

Setup (tests/helpers/cluster.py): ``--hosts`` sandboxes on the underlay 192.168.250.0/24,
an etcd member and the daemon on each; the overlay network ``ov``, VMs ``tpa`` (host a)
and ``tpb`` (host b).  Traffic goes only to the run's namespaces.  Parts (``--skip``):

1. throughput: iperf3 (``-O 1``, receiver's rate) from ``tpa`` to ``tpb``; baseline: host
   a to host b's underlay address.  -P 1 and 4, ``--runs`` rounds, the order alternating;
2. convergence: the clock starts before ``hnsctl vm create`` on a (``--ip``: an address
   per trial); ``tpb`` pings it every 2 ms until the first answer (``ping -D``: its time).
   ``tpb``'s ARP retry time is 10 ms (default 1 s): the figure is the overlay's, not the
   pinger's ARP timer's.  Baseline: ``hnsctl vm show`` (the CLI's start-up, no change);
3. recovery: a majority of etcd members (b, c of 3 or 4) killed, a create on a failing;
   the members restarted: time until a create on a succeeds and ``tpb`` pings its VM;
4. scale: ``--vms-per-host`` VMs on every host of a network ``scale`` (hosts in parallel),
   half first: VMs/s, the entries of each host's VXLAN device (``bridge fdb`` ``self``
   with a ``dst``, ``ip neigh`` ``nud permanent``: 2 per VM of the other hosts), each
   daemon's CPU (/proc/PID/stat) over ``--idle-seconds``, before and after.

The cluster is closed in a ``finally`` (also on Ctrl-C, SIGTERM).  Goals are printed, not
asserted: exit 0 whether or not they are met, 1 on an error, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from harness import positive_int, progress, run_hermetic, wait_until

from hns.testing.sandbox import Peer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from helpers.cluster import ETCD_BIN, Cluster, ClusterHost

PARTS = ("throughput", "convergence", "recovery", "scale")
NETWORK, SUBNET = "ov", "10.240.0.0/16"
SCALE_NETWORK, SCALE_SUBNET = "scale", "10.241.0.0/16"
TRIAL_BASE = IPv4Address("10.240.100.10")      # convergence trial i: TRIAL_BASE + i
RECOVERY_BASE = IPv4Address("10.240.200.10")   # recovery i
VM_PORT, UNDERLAY_PORT = 5201, 5202
GOAL_RATIO, GOAL_P99_MS, GOAL_IDLE_PERCENT, GOAL_RECOVERY_S = 0.8, 500.0, 2.0, 2.0
ANSWER = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from ", re.MULTILINE)


@dataclass(frozen=True)
class Spread:
    n: int
    p50: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        v = sorted(values)
        p99 = statistics.quantiles(v, n=100, method="inclusive")[98] if len(v) > 1 else v[0]
        return cls(len(v), statistics.median(v), p99, v[0], v[-1])


@dataclass(frozen=True)
class Throughput:
    streams: int
    overlay_gbps: list[float]        # per round
    underlay_gbps: list[float]
    ratio: float                     # of the medians
    paired: list[float]              # each round's overlay / underlay

    @classmethod
    def of(cls, streams: int, overlay: list[float], underlay: list[float]) -> Throughput:
        return cls(streams, overlay, underlay,
                   statistics.median(overlay) / statistics.median(underlay),
                   [o / u for o, u in zip(overlay, underlay, strict=True)])


@dataclass(frozen=True)
class Convergence:
    cli_ms: Spread                   # hnsctl vm create's own duration
    create_to_ping_ms: Spread        # before the create -> first answer
    return_to_ping_ms: Spread        # the create returned -> first answer (< 0: before)
    baseline_cli_ms: Spread          # hnsctl vm show


@dataclass(frozen=True)
class Recovery:
    failing_create_s: list[float]    # the create that failed without quorum
    create_ok_s: list[float]         # restart -> a create succeeded
    first_ping_s: list[float]        # restart -> its first answer
    both_s: list[float]              # restart -> both
    attempts: list[int]              # creates tried after the restart


@dataclass(frozen=True)
class Stage:
    vms_per_host: int                # on each host once the stage is done
    created: int
    seconds: float
    rate: float                      # VMs/s
    settle_s: float                  # last create returned -> every count as expected
    counts: dict[str, int]
    expected: int


@dataclass
class Results:
    hosts: int
    throughput: list[Throughput] = field(default_factory=list)
    convergence: Convergence | None = None
    recovery: Recovery | None = None
    stages: list[Stage] = field(default_factory=list)                # scale
    idle_before_percent: dict[str, float] = field(default_factory=dict)
    idle_percent: dict[str, float] = field(default_factory=dict)     # with the VMs

    def goals(self) -> list[tuple[str, float, str, bool]]:
        """(name, value, goal text, met)."""
        g = [(f"iperf3 -P {t.streams}, overlay / underlay", t.ratio, ">=", GOAL_RATIO)
             for t in self.throughput]
        if c := self.convergence:
            g += [("create -> first ping p99 (ms)", c.create_to_ping_ms.p99, "<=", GOAL_P99_MS)]
        if r := self.recovery:
            g += [("quorum back -> create + ping, worst (s)", max(r.both_s), "<=", GOAL_RECOVERY_S)]
        g += [(f"entries at {st.vms_per_host} VMs/host: most off {st.expected}",
               max(abs(n - st.expected) for n in st.counts.values()), "<=", 0)
              for st in self.stages]
        if self.idle_percent:
            g.append(("idle daemon, worst host (% of a core)", max(self.idle_percent.values()),
                      "<=", GOAL_IDLE_PERCENT))
        return [(n, v, f"{op} {t:g}", v >= t if op == ">=" else v <= t) for n, v, op, t in g]


def ctl(host: ClusterHost, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``hnsctl ARGS`` on ``host`` (with ``check``: RuntimeError unless it exits 0)."""
    result = host.hnsctl(*args, timeout=60)
    if check and result.returncode != 0:
        raise RuntimeError(f"host {host.name}: hnsctl {' '.join(args)}: exit "
                           f"{result.returncode}: {result.stderr.strip()}")
    return result


def create_vm(host: ClusterHost, name: str, network: str, ip: IPv4Address | None = None,
              check: bool = True) -> subprocess.CompletedProcess[str]:
    return ctl(host, "vm", "create", name, "--network", network, "--json",
               *(["--ip", str(ip)] if ip else []), check=check)


def run_ok(peer: Peer | ClusterHost, argv: list[str]) -> str:
    if (result := peer.run(argv)).returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return str(result.stdout)


class Pinger:
    """``ping`` every 2 ms from a VM until the first answer or ``deadline`` s (not ``-w``:
    ping then ends at the first "unreachable"); output to a file, never a full pipe."""

    def __init__(self, vm: Peer, address: str, deadline: int) -> None:
        self._out, self.deadline = tempfile.TemporaryFile(), deadline  # noqa: SIM115
        self.proc = vm.popen(["ping", "-n", "-D", "-i", "0.002", address],
                             stdout=self._out, stderr=subprocess.DEVNULL)
        comm = f"/proc/{self.proc.pid}/comm"               # "ping": ip netns exec'd it
        wait_until(lambda: Path(comm).read_text().strip() == "ping", "ping", timeout=10)
        time.sleep(0.02)                           # its socket made, the first probe out

    def answer(self) -> float | None:
        """The wall-clock time of the first answer, None if none came."""
        text, offset = "", 0
        until = time.monotonic() + self.deadline
        try:
            while True:
                done = self.proc.poll() is not None or time.monotonic() > until
                chunk = os.pread(self._out.fileno(), 1 << 16, offset)
                offset += len(chunk)
                text = text[text.rfind("\n") + 1:] + chunk.decode(errors="replace")
                found = ANSWER.search(text)
                if found or done:
                    return float(found.group(1)) if found else None
                time.sleep(0.002)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self._out.close()


def iperf(client: Peer, server: str, port: int, seconds: int, streams: int) -> float:
    result = client.run(["iperf3", "-c", server, "-p", str(port), "-t", str(seconds), "-O",
                         "1", "-J", "-P", str(streams)], timeout=seconds + 60)
    data = json.loads(result.stdout or "{}")
    if result.returncode != 0 or "error" in data:
        raise RuntimeError(f"iperf3 to {server}:{port} failed: "
                           f"{data.get('error') or result.stderr.strip()}")
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9


def throughput(a: ClusterHost, b: ClusterHost, tpa: Peer, tpb: tuple[Peer, str],
               args: argparse.Namespace) -> list[Throughput]:
    server_vm, server_ip = tpb
    server_vm.popen(["iperf3", "-s", "-p", str(VM_PORT)])
    b.sandbox.host.popen(["iperf3", "-s", "-B", b.address, "-p", str(UNDERLAY_PORT)])
    wait_until(lambda: all(run_ok(p, ["ss", "-Hltn", f"sport = :{n}"]) for p, n in (
        (server_vm, VM_PORT), (b.sandbox.host, UNDERLAY_PORT))), "the iperf3 servers")
    ways: dict[str, Callable[[int], float]] = {
        "overlay": lambda n: iperf(tpa, server_ip, VM_PORT, args.seconds, n),
        "underlay": lambda n: iperf(a.sandbox.host, b.address, UNDERLAY_PORT,
                                    args.seconds, n)}
    found: dict[tuple[str, int], list[float]] = {}
    for run in range(args.runs):
        order = ["overlay", "underlay"] if run % 2 == 0 else ["underlay", "overlay"]
        for streams in (1, 4):
            for way in order:
                found.setdefault((way, streams), []).append(ways[way](streams))
        progress(f"  round {run + 1}/{args.runs} ({order[0]} first), overlay / underlay: " +
                 ", ".join(f"-P {n} {found[('overlay', n)][-1]:.2f} / "
                           f"{found[('underlay', n)][-1]:.2f} Gbit/s" for n in (1, 4)))
    return [Throughput.of(n, found[("overlay", n)], found[("underlay", n)]) for n in (1, 4)]


def convergence(a: ClusterHost, pinger_vm: Peer, trials: int) -> Convergence:
    cli, to_ping, after, baseline = [], [], [], []       # ms
    for i in range(trials):
        name, ip = f"cv{i:03d}", TRIAL_BASE + i
        t0 = time.monotonic()
        ctl(a, "vm", "show", "tpa", "--json")
        baseline.append((time.monotonic() - t0) * 1000)
        pinger = Pinger(pinger_vm, str(ip), deadline=10)
        t0 = time.time()
        create_vm(a, name, NETWORK, ip)
        t1 = time.time()
        answered = pinger.answer()
        ctl(a, "vm", "delete", name)
        if answered is None:
            raise RuntimeError(f"trial {i}: no answer from vm {name} ({ip}) within 10 s")
        cli.append((t1 - t0) * 1000)
        to_ping.append((answered - t0) * 1000)
        after.append((answered - t1) * 1000)
        if (i + 1) % 10 == 0 or i + 1 == trials:
            progress(f"  {i + 1}/{trials}: create {cli[-1]:.0f} ms, create -> ping "
                     f"{to_ping[-1]:.0f} ms")
    return Convergence(*(Spread.of(v) for v in (cli, to_ping, after, baseline)))


def recovery_trial(cluster: Cluster, a: ClusterHost, pinger_vm: Peer, trial: int,
                   members: list[str]) -> tuple[float, float, float, int]:
    """(failing create, restart -> create ok, restart -> first ping (s), creates tried)."""
    for member in members:
        cluster.etcd.kill(member)
    t0 = time.monotonic()
    if create_vm(a, f"rf{trial}", NETWORK, check=False).returncode == 0:
        raise RuntimeError(f"vm rf{trial} was created with etcd members {members} killed")
    failing = time.monotonic() - t0
    name, ip = f"rv{trial}", RECOVERY_BASE + trial
    pinger = Pinger(pinger_vm, str(ip), deadline=60)
    start = time.time()
    for member in members:
        cluster.etcd.start(member, wait=False)
    attempts = 1
    while (result := create_vm(a, name, NETWORK, ip, check=False)).returncode != 0:
        if time.time() - start > 60:
            raise RuntimeError(f"no create on host a within 60 s of the restart: "
                               f"{result.stderr.strip()}")
        attempts += 1
    created = time.time() - start
    answered = pinger.answer()
    if answered is None:
        raise RuntimeError(f"no answer from vm {name} ({ip}) within 60 s of the restart")
    cluster.etcd.wait_healthy()
    ctl(a, "vm", "delete", name)
    progress(f"  {trial + 1}: failing create {failing:.1f} s; after the restart: create ok "
             f"{created:.2f} s ({attempts} tries), first ping {answered - start:.2f} s")
    return failing, created, answered - start, attempts


def recovery(cluster: Cluster, a: ClusterHost, pinger_vm: Peer, count: int) -> Recovery:
    names = [h.name for h in cluster.hosts]
    members = names[1:1 + len(names) - len(names) // 2]        # a majority, a not in it
    progress(f"  killing etcd members {', '.join(members)} of {len(names)} each time")
    figures = [recovery_trial(cluster, a, pinger_vm, t, members) for t in range(count)]
    failing, created, pinged, attempts = (list(x) for x in zip(*figures, strict=True))
    return Recovery(failing, created, pinged, [max(c, p) for c, p in zip(
        created, pinged, strict=True)], [int(n) for n in attempts])


def entry_count(host: ClusterHost, device: str) -> int:
    fdb = json.loads(run_ok(host, ["bridge", "-j", "fdb", "show", "dev", device]) or "[]")
    neigh = json.loads(run_ok(host, ["ip", "-j", "neigh", "show", "dev", device, "nud",
                                     "permanent"]) or "[]")
    return sum(1 for e in fdb if "self" in e.get("flags", []) and e.get("dst")) + len(neigh)


def create_many(hosts: list[ClusterHost], start: int, stop: int) -> float:
    """VMs ``start`` to ``stop`` - 1 on every host, the hosts in parallel; seconds."""
    halt = threading.Event()                  # an error or interrupt: the others stop

    def work(host: ClusterHost) -> None:
        try:
            for i in range(start, stop):
                if not halt.is_set():
                    create_vm(host, f"s{host.name}{i:03d}", SCALE_NETWORK)
        except BaseException:
            halt.set()
            raise
    t0 = time.monotonic()
    pool = ThreadPoolExecutor(len(hosts))
    try:
        for future in [pool.submit(work, h) for h in hosts]:
            future.result()
    finally:
        halt.set()
        pool.shutdown(wait=False)
    return time.monotonic() - t0


def stage(hosts: list[ClusterHost], devices: dict[str, str], start: int, stop: int) -> Stage:
    progress(f"  creating VMs {start}..{stop - 1} on each of {len(hosts)} hosts")
    seconds = create_many(hosts, start, stop)
    expected, created = (len(hosts) - 1) * stop * 2, len(hosts) * (stop - start)
    t0 = time.monotonic()
    counts: dict[str, int] = {}

    def settled() -> bool:
        counts.update({h.name: entry_count(h, devices[h.name]) for h in hosts})
        return all(n == expected for n in counts.values())
    with contextlib.suppress(RuntimeError):                 # the counts say how far
        wait_until(settled, "the VXLAN entries", timeout=60 + 0.1 * len(hosts) * stop)
    settle = time.monotonic() - t0
    progress(f"  {created} VMs in {seconds:.1f} s; entries {counts} (expected {expected}) "
             f"{settle:.1f} s after the last create")
    return Stage(stop, created, seconds, created / seconds, settle, dict(counts), expected)


def idle_cpu(hosts: list[ClusterHost], seconds: int) -> dict[str, float]:
    """Each daemon's CPU (utime + stime, all threads) over the same ``seconds``, in % of
    one core."""
    pids = {h.name: h.daemon.proc.pid for h in hosts if h.daemon and h.daemon.proc}

    def ticks() -> dict[str, int]:                     # fields 14, 15: utime, stime
        return {n: sum(map(int, Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]
                           .split()[11:13])) for n, pid in pids.items()}
    progress(f"  idle daemons, {seconds} s")
    start, t0 = ticks(), time.monotonic()
    time.sleep(seconds)
    end, elapsed = ticks(), time.monotonic() - t0
    return {n: 100.0 * (end[n] - start[n]) / os.sysconf("SC_CLK_TCK") / elapsed for n in end}


def scale(cluster: Cluster, args: argparse.Namespace, results: Results) -> None:
    hosts = cluster.hosts
    results.idle_before_percent = idle_cpu(hosts, args.idle_seconds)
    vni = json.loads(ctl(hosts[0], "network", "create", SCALE_NETWORK, "--type", "overlay",
                         "--subnet", SCALE_SUBNET, "--json").stdout)["Vni"]
    devices = {}
    for host in hosts:                              # VM 0 of each: the device is there
        create_vm(host, f"s{host.name}000", SCALE_NETWORK)
        links = json.loads(run_ok(host, ["ip", "-d", "-j", "link", "show", "type", "vxlan"]))
        devices[host.name] = next(str(k["ifname"]) for k in links
                                  if k["linkinfo"]["info_data"]["id"] == vni)
    half = args.vms_per_host // 2
    results.stages = [stage(hosts, devices, 1, half)] if half > 1 else []
    results.stages.append(stage(hosts, devices, max(half, 1), args.vms_per_host))
    time.sleep(2.0)                                  # the last events handled
    results.idle_percent = idle_cpu(hosts, args.idle_seconds)


def measure(cluster: Cluster, args: argparse.Namespace, peers: list[Peer]) -> Results:
    for host in cluster.hosts:
        host.start_daemon()
    a, b = cluster["a"], cluster["b"]
    ctl(a, "network", "create", NETWORK, "--type", "overlay", "--subnet", SUBNET)
    ta, tb = (json.loads(create_vm(h, f"tp{h.name}", NETWORK).stdout) for h in (a, b))
    peers += [tpa := Peer(ta["NetNs"]), tpb := Peer(tb["NetNs"])]
    tpb_ip = str(tb["IpAddress"])
    run_ok(tpb, ["sysctl", "-q", "-w",
                 f"net.ipv4.neigh.{tb['InterfaceName']}.retrans_time_ms=10"])
    wait_until(lambda: tpa.run(["ping", "-c1", "-W1", tpb_ip]).returncode == 0,
               "tpb to answer tpa's ping")
    results = Results(len(cluster.hosts))
    if "throughput" not in args.skip:
        progress(f"throughput: {args.runs} rounds of iperf3 -t {args.seconds}")
        results.throughput = throughput(a, b, tpa, (tpb, tpb_ip), args)
    if "convergence" not in args.skip:
        progress(f"convergence: {args.trials} trials")
        results.convergence = convergence(a, tpb, args.trials)
    if "recovery" not in args.skip:
        progress(f"recovery: {args.recoveries} times")
        results.recovery = recovery(cluster, a, tpb, args.recoveries)
    if "scale" not in args.skip:
        progress(f"scale: {results.hosts} hosts x {args.vms_per_host} VMs")
        scale(cluster, args, results)
    return results


def run(args: argparse.Namespace) -> Results:
    hosts = args.hosts if "scale" not in args.skip else \
        min(args.hosts, 3 if "recovery" not in args.skip else 2)
    progress(f"building a cluster of {hosts} hosts")
    cluster = Cluster(hosts=hosts)
    peers: list[Peer] = []
    try:
        return measure(cluster, args, peers)
    finally:
        progress("closing the cluster")
        for peer in peers:
            peer.stop_processes()
        cluster.close()


def _range(v: Sequence[float], digits: int = 2) -> str:
    return f"{min(v):.{digits}f}-{max(v):.{digits}f}"


def print_table(r: Results) -> None:
    for t in r.throughput:
        print(f"iperf3 -P {t.streams}: overlay {statistics.median(t.overlay_gbps):.2f} Gbit/s "
              f"({_range(t.overlay_gbps)}), baseline underlay "
              f"{statistics.median(t.underlay_gbps):.2f} ({_range(t.underlay_gbps)}) = "
              f"{t.ratio:.2f}x; per round {', '.join(f'{p:.2f}' for p in t.paired)}")
    if c := r.convergence:
        for label, sp in (("hnsctl vm create (CLI)", c.cli_ms),
                          ("create -> first ping", c.create_to_ping_ms),
                          ("create returned -> first ping", c.return_to_ping_ms),
                          ("baseline: hnsctl vm show", c.baseline_cli_ms)):
            print(f"{label:<30} n={sp.n} p50 {sp.p50:6.0f} p99 {sp.p99:6.0f} "
                  f"range {sp.min:.0f}..{sp.max:.0f} ms")
    if v := r.recovery:
        print(f"recovery, restart -> create ok and pinged: median "
              f"{statistics.median(v.both_s):.2f} s ({_range(v.both_s)}); create ok "
              f"{_range(v.create_ok_s)} s, {v.attempts} tries; first ping "
              f"{_range(v.first_ping_s)} s; the failing create took "
              f"{_range(v.failing_create_s, 1)} s")
    for st in r.stages:
        print(f"scale {r.hosts} x {st.vms_per_host}: {st.created} VMs in {st.seconds:.1f}"
              f" s = {st.rate:.2f} VMs/s; entries {st.counts} (expected {st.expected}), "
              f"all there {st.settle_s:.1f} s after the last create")
    if r.idle_percent:
        print("idle daemon CPU (% of a core), before / with the VMs: " + ", ".join(
            f"{n} {r.idle_before_percent[n]:.2f} / {p:.2f}" for n, p in r.idle_percent.items()))
    print(f"\n{'goal':<48}{'value':>10}{'goal':>14}  result")
    for name, value, goal, met in r.goals():
        print(f"{name:<48}{value:>10.2f}{goal:>14}  {'PASS' if met else 'MISSED'}")


def parts(text: str) -> frozenset[str]:
    """An argparse type: a comma list of PARTS."""
    chosen = frozenset(p.strip() for p in text.split(",") if p.strip())
    if chosen - set(PARTS):
        raise argparse.ArgumentTypeError(f"unknown: {', '.join(sorted(chosen - set(PARTS)))}"
                                         f" (parts: {', '.join(PARTS)})")
    return chosen


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    for flag, default, what in (("--hosts", 4, "hosts (at least 2)"),
                                ("--vms-per-host", 100, "scale: VMs per host"),
                                ("--trials", 50, "convergence trials"),
                                ("--recoveries", 3, "quorum losses"),
                                ("--runs", 3, "iperf3 rounds"),
                                ("--seconds", 5, "iperf3 run length"),
                                ("--idle-seconds", 10, "idle CPU measurement length")):
        p.add_argument(flag, type=positive_int, default=default,
                       help=f"{what} (default %(default)s)")
    p.add_argument("--skip", type=parts, default=frozenset(),
                   help=f"parts to leave out, comma-separated: {','.join(PARTS)}")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = p.parse_args(argv)
    if args.hosts < 2:
        p.error("--hosts: an overlay needs at least 2 hosts")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def report(results: Results) -> None:
        if args.json:
            print(json.dumps({**asdict(results), "goals": [
                {"name": n, "value": v, "goal": g, "pass": ok}
                for n, v, g, ok in results.goals()]}, indent=2))
        else:
            print_table(results)
    return run_hermetic(lambda: run(args), report, tools=(
        "iperf3", "ss", "bridge", "ping", "setpriv", "env", ETCD_BIN, "etcdctl"))


if __name__ == "__main__":
    sys.exit(main())
