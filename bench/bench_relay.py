"""Benchmark of the relay engine against the kernel and socat, hermetic: all in a Sandbox.

Setup: a NAT network ``bench`` (``--firewall off``: see direct) with a VM ``srv``
running an iperf3 server (port 5201) and a small echo server (port 7000, epoll, this
script's ``--role echo``).  The host namespace offers each of them four ways, and every
client runs in the outside namespace, on the same links whatever the way -- which is why
that is the fair comparison:

* **direct**: the VM's own address, routed through the host without NAT or relay (a
  route to the subnet is added to the outside namespace for the benchmark);
* **dnat**: the uplink address, a kernel DNAT rule of our own (``table inet benchdnat``);
* **engine**: the uplink address, the relay engine in its own process in the host
  namespace (this script's ``--role engine``; splice, the default worker loops);
* **socat**: the uplink address, ``socat TCP-LISTEN:P,fork,reuseaddr TCP:vm:port``.

Measures, in one run: iperf3 (``-t --seconds``, ``-O 1``; receiver's rate) with one
stream and with four (``-P 4``) through each way; the connection rate (``--conns`` short
connections -- connect, 16 bytes each way, close -- one at a time and ``--concurrency``
at once; client: this script's ``--role client``, Python, selectors), engine vs socat,
direct for reference; the round trip of 64-byte messages on one connection (p50, p99 of
``--rtts``), engine vs socat vs direct; and the engine's resident memory (VmRSS from
/proc) holding ``--idle`` connections that each made one round trip.  A process may not
hold more fds than its hard RLIMIT_NOFILE; where that is below 2 x ``--idle`` plus a
few, the engine holds as many as it may and the figure for ``--idle`` is extrapolated
from the measured cost per connection (the output says so).

With the throughput it prints the engine / direct ratio of every round (the ways of a
round run back to back, so a ratio compares like with like on a shared machine), the
engine's CPU time per GB relayed, and how busy the whole machine was during each way's
runs (a relay that terminates both connections needs more CPU per byte than forwarding:
once the machine is saturated, that is the limit).  ``--steps`` picks the measurements
and ``--ways`` the ways of the throughput runs (direct and engine at least).

Both namespaces get ``ip_local_port_range`` 10000-65000 and ``tcp_tw_reuse`` (thousands
of short connections leave TIME_WAITs).  The sandbox is closed in a ``finally``, also on
Ctrl-C or SIGTERM.  The goals are printed, not asserted: the exit status is 0 whether or
not they are met, 1 on an error, 130 on Ctrl-C.  ``--json`` prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

NETWORK = "bench"
IPERF, ECHO = 5201, 7000
WAYS = {"engine": 10000, "socat": 20000, "dnat": 30000}   # listening port = base + target
GOAL_THROUGHPUT = 0.8
GOAL_IDLE_MB = 150.0
MESSAGE = b"0123456789abcdef"
STEPS = ("throughput", "rate", "rtt", "idle")


def _progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _raise_nofile() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- roles: processes the benchmark starts in the namespaces -----------------------------


def role_engine(args: argparse.Namespace) -> int:
    """The relay engine, serving ``--tcp LISTEN_IP:PORT=CONNECT_IP:PORT`` until SIGTERM."""
    from portproxy.engine import Engine
    _raise_nofile()
    engine = Engine(pipe_size=args.pipe_size) if args.pipe_size else Engine()
    for spec in args.tcp:
        listen, connect = (_hostport(part) for part in spec.split("="))
        sock = socket.create_server(listen, backlog=4096)
        engine.add_tcp(sock, connect, name=spec)
    signal.signal(signal.SIGTERM, lambda *_: engine.stop())
    print("ready", flush=True)
    engine.run()
    engine.close()
    return 0


def role_echo(args: argparse.Namespace) -> int:
    """An epoll echo server for many connections, until SIGTERM."""
    _raise_nofile()
    server = socket.create_server(("0.0.0.0", args.port), backlog=4096)
    server.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(server, selectors.EVENT_READ)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is server:
                _accept_all(server, sel)
                continue
            try:
                data = sock.recv(65536)
                if data:
                    sock.send(data)      # small messages: the send buffer has room
                    continue
            except OSError:
                pass
            sel.unregister(sock)
            sock.close()


def _accept_all(server: socket.socket, sel: selectors.BaseSelector) -> None:
    while True:
        try:
            conn, _ = server.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sel.register(conn, selectors.EVENT_READ)


def _exchange(sock: socket.socket, message: bytes) -> None:
    sock.sendall(message)
    got = b""
    while len(got) < len(message):
        data = sock.recv(len(message) - len(got))
        if not data:
            raise ConnectionError("closed before the echo")
        got += data


def client_rate(host: str, port: int, count: int, concurrency: int) -> dict[str, float]:
    """``count`` short connections, ``concurrency`` at a time: connections per second."""
    sel = selectors.DefaultSelector()
    started = finished = errors = 0
    t0 = time.perf_counter()

    def start() -> None:
        nonlocal started
        started += 1
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex((host, port))
        sel.register(sock, selectors.EVENT_WRITE)

    for _ in range(min(concurrency, count)):
        start()
    while finished < count:
        for key, mask in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if mask & selectors.EVENT_WRITE:          # connected (or failed): ask
                try:
                    sock.send(MESSAGE)
                    sel.modify(sock, selectors.EVENT_READ)
                    continue
                except OSError:
                    errors += 1
            else:
                try:
                    if len(sock.recv(64)) != len(MESSAGE):   # short reads: rare, counted
                        errors += 1
                except OSError:
                    errors += 1
            sel.unregister(sock)
            sock.close()
            finished += 1
            if started < count:
                start()
    elapsed = time.perf_counter() - t0
    return {"per_s": count / elapsed, "errors": errors}


def client_rtt(host: str, port: int, count: int) -> dict[str, float]:
    """Round trips of 64-byte messages on one connection: p50 and p99 in microseconds."""
    message = MESSAGE * 4
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(100):                           # warm up
            _exchange(sock, message)
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            _exchange(sock, message)
            times.append((time.perf_counter() - t0) * 1e6)
    cuts = statistics.quantiles(times, n=100, method="inclusive")
    return {"p50_us": statistics.median(times), "p99_us": cuts[98]}


def client_idle(host: str, port: int, count: int) -> dict[str, float]:
    """Open ``count`` connections (one round trip each), say so, hold them until stdin ends."""
    _raise_nofile()
    socks = []
    for _ in range(count):
        sock = socket.create_connection((host, port), timeout=30)
        _exchange(sock, MESSAGE)
        socks.append(sock)
    print("ready", flush=True)
    sys.stdin.read()
    for sock in socks:
        sock.close()
    return {"held": len(socks)}


def role_client(args: argparse.Namespace) -> int:
    if args.mode == "rate":
        result = client_rate(args.host, args.port, args.count, args.concurrency)
    elif args.mode == "rtt":
        result = client_rtt(args.host, args.port, args.count)
    else:
        result = client_idle(args.host, args.port, args.count)
    print(json.dumps(result), flush=True)
    return 0


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


# -- the benchmark ---------------------------------------------------------------------


@dataclass
class Results:
    iperf: dict[str, dict[str, float]] = field(default_factory=dict)    # way -> P -> Gbit/s
    iperf_runs: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # every run
    engine_ratio_runs: dict[str, list[float]] = field(default_factory=dict)  # P -> per round
    rate: dict[str, dict[str, float]] = field(default_factory=dict)     # way -> conc -> /s
    rtt: dict[str, dict[str, float]] = field(default_factory=dict)      # way -> p50/p99
    idle: dict[str, float] = field(default_factory=dict)
    engine_cpu_s: dict[str, float] = field(default_factory=dict)        # during iperf runs
    engine_cpu_runs: dict[int, list[float]] = field(default_factory=dict)  # streams -> s
    engine_cpu_per_gb: dict[str, float] = field(default_factory=dict)   # CPU s per GB relayed
    machine_busy: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # 0..1
    notes: list[str] = field(default_factory=list)


class Bench:
    """The sandbox, the servers and the four ways to the VM."""

    def __init__(self, args: argparse.Namespace) -> None:
        from hns.testing.sandbox import Sandbox
        self.args = args
        self.sandbox = Sandbox()
        self.results = Results()
        self.engine: subprocess.Popen[str] | None = None

    def setup(self) -> None:
        sb = self.sandbox
        # isolation off: the direct baseline is the outside routed to the VM's address,
        # which isolation (on by default) keeps out; the relays' paths are the same
        sb.service.create_network(NETWORK, "nat", firewall=False)
        self.vm = sb.vm("srv", NETWORK)
        subnet = sb.service.get_network(NETWORK).subnet
        for peer in (sb.host, sb.outside):
            _must(peer.run(["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=10000 65000",
                            "net.ipv4.tcp_tw_reuse=1"]))
        _must(sb.outside.run(["ip", "route", "add", str(subnet), "via", sb.uplink_ip]))
        self.start_iperf_server()
        _ready(self.vm.popen(self._me("--role", "echo", "--port", str(ECHO)),
                             stdin=subprocess.DEVNULL))
        wait_listening(self.vm, IPERF)
        up, vm = sb.uplink_ip, self.vm.ip
        for target in (IPERF, ECHO):
            sb.host.popen(["socat", f"TCP-LISTEN:{WAYS['socat'] + target},fork,reuseaddr,"
                           f"bind={up},backlog=4096", f"TCP:{vm}:{target}"])
        rules = "table inet benchdnat {\n chain prerouting {\n" \
                "  type nat hook prerouting priority dstnat; policy accept;\n" + "".join(
                    f"  ip daddr {up} tcp dport {WAYS['dnat'] + t} dnat ip to {vm}:{t}\n"
                    for t in (IPERF, ECHO)) + " }\n}\n"
        _must(sb.host.run(["nft", "-f", "-"], input=rules))
        specs = [f"--tcp={up}:{WAYS['engine'] + t}={vm}:{t}" for t in (IPERF, ECHO)]
        if self.args.pipe_size:
            specs.append(f"--pipe-size={self.args.pipe_size}")
        self.engine = sb.host.popen(self._me("--role", "engine", *specs),
                                    stdin=subprocess.DEVNULL)
        _ready(self.engine)
        for way in ("socat",):
            for t in (IPERF, ECHO):
                wait_listening(sb.host, WAYS[way] + t)

    def start_iperf_server(self) -> None:
        self.iperf_server = self.vm.popen(["iperf3", "-s", "-p", str(IPERF)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def iperf(self, way: str, streams: int) -> float:
        """iperf3 through ``way``.  iperf3 3.12's server may hang when a relay makes a data
        connection arrive late (seen with socat as with the engine): the server is then
        restarted and the run repeated, and a note says so."""
        host, port = self.address(way, IPERF)
        for _attempt in range(3):
            try:
                return iperf_gbps(self.sandbox.outside, host, port, streams, self.args.seconds)
            except subprocess.TimeoutExpired:
                self.results.notes.append(f"iperf3 {way} -P {streams} hung; server restarted")
                self.iperf_server.kill()
                self.iperf_server.wait(10)
                self.start_iperf_server()
                wait_listening(self.vm, IPERF)
        raise RuntimeError(f"iperf3 through {way} hung three times")

    @staticmethod
    def _me(*args: str) -> list[str]:
        return [sys.executable, os.path.abspath(__file__), *args]

    def address(self, way: str, target: int) -> tuple[str, int]:
        if way == "direct":
            return self.vm.ip, target
        return self.sandbox.uplink_ip, WAYS[way] + target

    def client(self, *args: str) -> dict[str, float]:
        result = self.sandbox.outside.run(self._me("--role", "client", *args), timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"client {' '.join(args)}: {result.stderr.strip()}")
        return dict(json.loads(result.stdout.strip().splitlines()[-1]))

    def throughput(self) -> None:
        """Each way in turn, ``--runs`` rounds (drift hits every way alike); medians."""
        runs: dict[tuple[str, int], list[float]] = {}
        for round_ in range(self.args.runs):
            for streams in (1, 4):
                for way in self.args.ways:
                    _progress(f"iperf3 {way} -P {streams} ({round_ + 1}/{self.args.runs})")
                    runs.setdefault((way, streams), []).append(self._iperf_run(way, streams))
        r = self.results
        for (way, streams), gbps in runs.items():
            r.iperf.setdefault(way, {})[f"P{streams}"] = statistics.median(gbps)
            r.iperf_runs.setdefault(way, {})[f"P{streams}"] = gbps
        for streams in (1, 4):
            r.engine_ratio_runs[f"P{streams}"] = [
                e / d for e, d in zip(runs["engine", streams], runs["direct", streams],
                                      strict=True)]
            r.engine_cpu_s[f"P{streams}"] = statistics.median(r.engine_cpu_runs[streams])
            gbytes = [g * (self.args.seconds + 1) / 8 for g in runs["engine", streams]]
            r.engine_cpu_per_gb[f"P{streams}"] = statistics.median(
                c / gb for c, gb in zip(r.engine_cpu_runs[streams], gbytes, strict=True))

    def _iperf_run(self, way: str, streams: int) -> float:
        """One iperf3 run (Gbit/s); notes the engine's CPU time and the machine's."""
        cpu0, busy0 = self.engine_cpu(), machine_cpu()
        gbps = self.iperf(way, streams)
        cpu1, busy1 = self.engine_cpu(), machine_cpu()
        if way == "engine":
            self.results.engine_cpu_runs.setdefault(streams, []).append(cpu1 - cpu0)
        used = (busy1[0] - busy0[0]) / max(1e-9, busy1[1] - busy0[1])
        self.results.machine_busy.setdefault(way, {}).setdefault(f"P{streams}", []).append(used)
        return gbps

    def connection_rate(self) -> None:
        for way in ("direct", "engine", "socat"):
            host, port = self.address(way, ECHO)
            for conc in (1, self.args.concurrency):
                _progress(f"{self.args.conns} connections, {conc} at a time, {way}")
                got = self.client("--mode", "rate", "--host", host, "--port", str(port),
                                  "--count", str(self.args.conns), "--concurrency", str(conc))
                if got["errors"]:
                    self.results.notes.append(f"rate {way} c={conc}: {got['errors']:.0f} errors")
                self.results.rate.setdefault(way, {})[f"c{conc}"] = got["per_s"]

    def round_trips(self) -> None:
        for way in ("direct", "dnat", "engine", "socat"):
            host, port = self.address(way, ECHO)
            _progress(f"{self.args.rtts} round trips, {way}")
            self.results.rtt[way] = self.client("--mode", "rtt", "--host", host, "--port",
                                                str(port), "--count", str(self.args.rtts))

    def idle_memory(self) -> None:
        assert self.engine is not None
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        # two sockets per connection, and a margin for pooled pipes, listeners, stdio
        count = min(self.args.idle, (hard - 300) // 2)
        if count < self.args.idle:
            self.results.notes.append(
                f"RLIMIT_NOFILE hard limit {hard}: the engine held {count} connections; the "
                f"figure for {self.args.idle} is extrapolated from the cost per connection")
        host, port = self.address("engine", ECHO)
        before = rss_mb(self.engine.pid)
        _progress(f"{count} idle connections through the engine")
        holder = self.sandbox.outside.popen(
            self._me("--role", "client", "--mode", "idle", "--host", host, "--port", str(port),
                     "--count", str(count)), stdin=subprocess.PIPE)
        _ready(holder, timeout=600)
        held = rss_mb(self.engine.pid)
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(120)
        per_conn_kb = (held - before) * 1024 / count
        self.results.idle = {
            "connections": count, "rss_before_mb": before, "rss_held_mb": held,
            "per_connection_kb": per_conn_kb,
            "rss_at_goal_count_mb": before + per_conn_kb * self.args.idle / 1024,
        }

    def engine_cpu(self) -> float:
        assert self.engine is not None
        with open(f"/proc/{self.engine.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.engine is not None and self.engine.poll() is None:
            self.engine.send_signal(signal.SIGTERM)
            try:
                self.engine.wait(10)
            except subprocess.TimeoutExpired:
                self.engine.kill()
        self.sandbox.close()


def _must(result: subprocess.CompletedProcess[str]) -> None:
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, result.args))}: {result.stderr.strip()}")


def _ready(proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    """Wait for a role's "ready" line."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if sel.select(timeout) and proc.stdout.readline().strip() == "ready":
        return
    try:
        _, err = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    argv = " ".join(map(str, proc.args))  # type: ignore[arg-type]
    raise RuntimeError(f"{argv} did not start: {(err or '').strip()[-2000:]}")


def wait_listening(peer: Any, port: int) -> None:
    for _ in range(200):
        if peer.run(["ss", "-Hlnt", f"sport = :{port}"]).stdout.strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} in {peer.netns}")


def iperf_gbps(client: Any, host: str, port: int, streams: int, seconds: int) -> float:
    """One iperf3 run; the receiver's rate in Gbit/s.  TimeoutExpired if it hangs."""
    result = client.run(["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-O", "1",
                         "-P", str(streams), "-J"], timeout=seconds + 20)
    data = json.loads(result.stdout or "{}")
    if result.returncode != 0 or "error" in data:
        raise RuntimeError(f"iperf3 to {host}:{port} failed: "
                           f"{data.get('error') or result.stderr.strip()}")
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9


def machine_cpu() -> tuple[int, int]:
    """(busy, total) clock ticks of every CPU since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:8]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)     # idle and iowait are not busy


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def run(args: argparse.Namespace) -> Results:
    bench = Bench(args)
    try:
        _progress(f"sandbox {bench.sandbox.host_netns}")
        load = os.getloadavg()[0]
        bench.setup()
        steps: dict[str, Callable[[], None]] = {
            "throughput": bench.throughput, "rate": bench.connection_rate,
            "rtt": bench.round_trips, "idle": bench.idle_memory}
        for name in args.steps:
            steps[name]()
        bench.results.notes.append(
            f"load average (1 min) {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
            f"end, on {os.cpu_count()} CPUs: anything else running skews the figures")
        return bench.results
    finally:
        _progress("closing the sandbox")
        bench.close()


# -- output ----------------------------------------------------------------------------


def goals(r: Results, idle_goal: int) -> list[tuple[str, float, str, bool]]:
    """(name, value, limit text, passed) of the goals whose figures were measured."""
    out = []
    for p in ("P1", "P4") if r.iperf else ():
        ratio = r.iperf["engine"][p] / r.iperf["direct"][p]
        out.append((f"engine throughput / direct, {p}", ratio, f">= {GOAL_THROUGHPUT}x",
                    ratio >= GOAL_THROUGHPUT))
    for conc, per_s in r.rate.get("engine", {}).items():
        ratio = per_s / r.rate["socat"][conc]
        out.append((f"engine conn rate / socat, {conc}", ratio, ">= 1.0x", ratio >= 1.0))
    if r.idle:
        mb = r.idle["rss_at_goal_count_mb"]
        out.append((f"engine RSS with {idle_goal} idle conns (MB)", mb,
                    f"<= {GOAL_IDLE_MB:g}", mb <= GOAL_IDLE_MB))
    return out


def print_table(r: Results, args: argparse.Namespace) -> None:
    print("Clients in the outside namespace for every way; direct = routed to the VM address "
          "through the host (no NAT, no relay).")
    if r.iperf:
        print_throughput(r, args)
    if r.rate:
        print(f"\nconnection rate ({args.conns} short connections, Python selectors client; "
              f"conn/s)")
    for way, by_c in r.rate.items():
        cells = "".join(f"{c:>6}: {v:8.0f}" for c, v in by_c.items())
        print(f"  {way:<10}{cells}")
    if r.rtt:
        print(f"\nround trip, 64-byte messages on one connection ({args.rtts}; microseconds)")
    for way, rtt in r.rtt.items():
        print(f"  {way:<10} p50 {rtt['p50_us']:8.1f}   p99 {rtt['p99_us']:8.1f}")
    if r.idle:
        print_idle(r, args)
    for note in r.notes:
        print(f"note: {note}")
    print(f"\n{'goal':<46}{'value':>10}  {'limit':<10}result")
    for name, value, limit, passed in goals(r, args.idle):
        print(f"{name:<46}{value:>10.2f}  {limit:<10}{'PASS' if passed else 'MISS'}")


def print_throughput(r: Results, args: argparse.Namespace) -> None:
    title = f"iperf3 -t {args.seconds} -O 1, median [range] of {args.runs} (Gbit/s)"
    print(f"\n{title}")
    for way, by_p in r.iperf.items():
        cells = "".join(
            f"   -P {p[1:]} {by_p[p]:6.2f} [{min(r.iperf_runs[way][p]):.1f}-"
            f"{max(r.iperf_runs[way][p]):.1f}] {by_p[p] / r.iperf['direct'][p]:.2f}x"
            for p in ("P1", "P4"))
        print(f"  {way:<8}{cells}")
    ratios = "   ".join(
        f"-P {p[1:]}: " + " ".join(f"{x:.2f}" for x in r.engine_ratio_runs[p])
        for p in ("P1", "P4"))
    print(f"  engine / direct of each round: {ratios}")
    cpu = ", ".join(f"{p}: {s:.1f} s ({r.engine_cpu_per_gb[p]:.2f} s per GB)"
                    for p, s in r.engine_cpu_s.items())
    print(f"  engine CPU time during its runs ({args.seconds + 1} s each): {cpu}")
    busy = "; ".join(f"{way} " + " ".join(
        f"-P {p[1:]} {statistics.median(v) * 100:.0f}%" for p, v in by_p.items())
        for way, by_p in r.machine_busy.items())
    print(f"  machine CPU busy (all CPUs, everything running), median: {busy}")


def print_idle(r: Results, args: argparse.Namespace) -> None:
    i = r.idle
    print(f"\nengine RSS: {i['rss_before_mb']:.1f} MB at start, {i['rss_held_mb']:.1f} MB "
          f"holding {i['connections']:.0f} idle connections ({i['per_connection_kb']:.2f} "
          f"KB each) -> {i['rss_at_goal_count_mb']:.1f} MB for {args.idle}")


# -- command line ----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seconds", type=int, default=5, help="iperf3 -t (default %(default)s)")
    p.add_argument("--runs", type=int, default=3,
                   help="iperf3 runs per way and -P, median (default %(default)s)")
    p.add_argument("--conns", type=int, default=5000,
                   help="short connections per rate run (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=50,
                   help="connections at once in the second rate run (default %(default)s)")
    p.add_argument("--rtts", type=int, default=5000, help="round trips (default %(default)s)")
    p.add_argument("--idle", type=int, default=10000,
                   help="idle connections held by the engine (default %(default)s)")
    p.add_argument("--pipe-size", type=int, default=0,
                   help="the engine's pipe size in bytes (default: the engine's)")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS),
                   help="what to measure (default: all of %(choices)s)")
    p.add_argument("--ways", nargs="+", choices=("direct", "dnat", "engine", "socat"),
                   default=["direct", "dnat", "engine", "socat"],
                   help="the ways iperf3 measures, in each round (default: all)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--role", choices=("bench", "engine", "echo", "client"), default="bench",
                   help=argparse.SUPPRESS)
    p.add_argument("--tcp", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("rate", "rtt", "idle"), help=argparse.SUPPRESS)
    p.add_argument("--host", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not {"direct", "engine"} <= set(args.ways):
        p.error("--ways must include direct and engine")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    roles = {"engine": role_engine, "echo": role_echo, "client": role_client}
    if args.role in roles:
        return roles[args.role](args)
    def report(results: Results) -> None:
        if args.json:
            print(json.dumps(asdict(results) | {"goals": goals(results, args.idle)}, indent=2))
        else:
            print_table(results, args)
    from harness import run_hermetic
    return run_hermetic(lambda: run(args), report, tools=("iperf3", "socat"))


if __name__ == "__main__":
    sys.exit(main())
