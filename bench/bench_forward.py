"""Benchmark of localhost forwarding, hermetic: everything runs in one Sandbox.

Setup: a NAT network ``bench`` with ``--vms`` VMs (``vm00`` ...), the daemon as a
subprocess (``hnsctl daemon``, as the tests run it) in the sandbox's host namespace;
``vm00`` runs an iperf3 server (port 5201) and is where the trials listen.

Measures:

1. idle cost: the daemon's CPU time (utime + stime of /proc/<pid>/stat, every thread)
   over ``--idle-seconds`` with one VM, then with ``--vms`` VMs, nothing happening;
2. detection, ``--trials`` times on a fresh port each: ``listen()`` on a socket inside
   ``vm00`` (bound to ``--bind``, 127.0.0.1) to the first connect that succeeds at host 127.0.0.1
   (then checked end to end: the VM accepts the relayed connection and a byte comes
   back); and ``close()`` of that socket to the first connect the host port refuses.
   The client polls every millisecond from a thread inside the host namespace;
3. throughput: iperf3 (``-t --seconds``, ``-O 1``, receiver's rate) from the host
   namespace to 127.0.0.1:5201 through the forward, and directly to the VM's address
   (the baseline), one stream and four (``-P 4``), the paths taken in turn ``--runs``
   times (median); and one ``--bidir`` run each way to show both directions move at
   once (WSL's relay deadlocked there, issue 41680);
4. connections: ``--conns`` short connections one after the other (connect, one byte
   back, close) through the forward and directly; and the engine-thread cost of one
   dial into the VM with the socket pool and with a synchronous executor call.

The sandbox is closed in a ``finally`` (also on Ctrl-C or SIGTERM) and the daemon is
stopped there.  Goals are printed, not asserted: the exit status is 0 whether or not
they are met, 1 on an error, 130 on Ctrl-C.  ``--json`` prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from harness import Daemon, positive_int, progress, run_hermetic, start_daemon, wait_until

from hns.daemon.control import request
from hns.netns import NAMESPACES, NetnsExecutor
from hns.testing.sandbox import Peer, Sandbox, SandboxVm
from portproxy.vmdial import VmDialer

NETWORK = "bench"
IPERF_PORT = 5201
TRIAL_BASE = 21000       # detection trials listen on TRIAL_BASE + i
CONN_PORT = 7000
DIAL_PORT = 7001
GOAL_P50_MS = 30.0
GOAL_P99_MS = 100.0
GOAL_RATIO = 0.8
GOAL_IDLE_PERCENT = 2.0
WSL_POLL_S = 1.0         # WSL's guest polls its listeners once a second


@dataclass(frozen=True)
class Latency:
    n: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        ms = sorted(s * 1000.0 for s in seconds)
        p99 = statistics.quantiles(ms, n=100, method="inclusive")[98] if len(ms) > 1 else ms[0]
        return cls(len(ms), statistics.median(ms), p99, ms[-1])


@dataclass(frozen=True)
class Rate:
    forward: float
    direct: float

    @property
    def ratio(self) -> float:
        return self.forward / self.direct if self.direct else 0.0


@dataclass(frozen=True)
class Results:
    vms: int
    idle_one_percent: float
    idle_all_percent: float
    listen: Latency
    close: Latency
    one_stream_gbps: Rate
    four_streams_gbps: Rate
    bidir_gbps: dict[str, float]
    conns_per_s: Rate
    dial_pool_us: float
    dial_sync_us: float

    def goals(self) -> list[tuple[str, float, str, bool]]:
        """(name, value, goal text, met)."""
        return [
            ("listen -> connect p50 (ms)", self.listen.p50_ms, f"<= {GOAL_P50_MS:g}",
             self.listen.p50_ms <= GOAL_P50_MS),
            ("listen -> connect p99 (ms)", self.listen.p99_ms, f"<= {GOAL_P99_MS:g}",
             self.listen.p99_ms <= GOAL_P99_MS),
            ("close -> refused p50 (ms)", self.close.p50_ms, f"<= {GOAL_P50_MS:g}",
             self.close.p50_ms <= GOAL_P50_MS),
            ("close -> refused p99 (ms)", self.close.p99_ms, f"<= {GOAL_P99_MS:g}",
             self.close.p99_ms <= GOAL_P99_MS),
            ("1 stream, forward / direct", self.one_stream_gbps.ratio, f">= {GOAL_RATIO:g}",
             self.one_stream_gbps.ratio >= GOAL_RATIO),
            ("4 streams, forward / direct", self.four_streams_gbps.ratio, f">= {GOAL_RATIO:g}",
             self.four_streams_gbps.ratio >= GOAL_RATIO),
            (f"idle daemon, {self.vms} VMs (% of a core)", self.idle_all_percent,
             f"<= {GOAL_IDLE_PERCENT:g}", self.idle_all_percent <= GOAL_IDLE_PERCENT),
        ]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["goals"] = [{"name": n, "value": v, "goal": g, "pass": p}
                         for n, v, g, p in self.goals()]
        return data


# -- the daemon ------------------------------------------------------------------------


def forwarding(sb: Sandbox, port: int) -> bool:
    answer = request(sb.state_dir, "status", timeout=2.0) or {}
    return any(f["Port"] == port and f["State"] == "forwarding"
               for f in answer.get("Forwards", []))


def cpu_percent(pid: int, seconds: float) -> float:
    """CPU time of a process (all its threads) over ``seconds``, in % of one core."""
    def ticks() -> int:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])      # utime, stime
    start, t0 = ticks(), time.monotonic()
    time.sleep(seconds)
    used = (ticks() - start) / os.sysconf("SC_CLK_TCK")
    return 100.0 * used / (time.monotonic() - t0)


# -- detection ---------------------------------------------------------------------------


def _connect(port: int) -> socket.socket | bool:
    """A connection to host 127.0.0.1:port (host namespace thread); False if refused, True
    if reset (a forward was there, ending)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    try:
        sock.connect(("127.0.0.1", port))
    except (ConnectionRefusedError, ConnectionResetError) as exc:
        sock.close()
        return isinstance(exc, ConnectionResetError)
    return sock


def _until_connect(listener: socket.socket, port: int, limit: float) -> float:
    """listen(), then poll the host port until a connection works end to end."""
    t0 = time.perf_counter()
    listener.listen(16)
    while time.perf_counter() - t0 < limit:
        client = _connect(port)
        if not isinstance(client, socket.socket):
            time.sleep(0.001)
            continue
        elapsed = time.perf_counter() - t0
        with client:
            conn, _ = listener.accept()            # the relay's connection inside the VM
            with conn:
                conn.sendall(b"!")
                if client.recv(1) == b"!":
                    return elapsed
    raise RuntimeError(f"port {port} not forwarded within {limit:g} s")


def _until_refused(listener: socket.socket, port: int, limit: float) -> float:
    t0 = time.perf_counter()
    listener.close()
    while time.perf_counter() - t0 < limit:
        client = _connect(port)
        if client is False:
            return time.perf_counter() - t0
        if isinstance(client, socket.socket):
            client.close()
        time.sleep(0.001)
    raise RuntimeError(f"port {port} still forwarded {limit:g} s after close")


def pause(seconds: float) -> None:
    """Wait by spinning: a sleeping thread tends to wake together with the daemon's
    timer on this (virtualised) machine, which would put every trial just after one of
    the daemon's polls, the worst case, instead of anywhere between two."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def detection(sb: Sandbox, vm: SandboxVm, trials: int, bind: str = "127.0.0.1"
              ) -> tuple[Latency, Latency]:
    listen: list[float] = []
    close: list[float] = []
    rng = random.Random(4851)
    with NetnsExecutor(sb.host_netns) as host:
        for i in range(trials):
            listener = vm.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.settimeout(2.0)
            listener.bind((bind, TRIAL_BASE + i))
            pause(rng.uniform(0.0, 0.1))         # out of step with the daemon's polling
            listen.append(host.call(_until_connect, listener, TRIAL_BASE + i, 10.0))
            pause(rng.uniform(0.0, 0.1))
            if bind == "127.0.0.1":
                close.append(host.call(_until_refused, listener, TRIAL_BASE + i, 10.0))
            else:       # the VM itself refuses at once: the release is the daemon's
                close.append(_until_released(sb, listener, TRIAL_BASE + i, 10.0))
    return Latency.of(listen), Latency.of(close)


def _until_released(sb: Sandbox, listener: socket.socket, port: int, limit: float) -> float:
    """close(), then poll the daemon's status until the forward is gone (a port the VM
    listened on with 0.0.0.0 is refused by the VM itself as soon as it closes, so the
    host's refusal would say nothing of the daemon)."""
    t0 = time.perf_counter()
    listener.close()
    while time.perf_counter() - t0 < limit:
        if not forwarding(sb, port):
            return time.perf_counter() - t0
    raise RuntimeError(f"port {port} still forwarded {limit:g} s after close")


# -- throughput and connections ----------------------------------------------------------


def iperf(client: Peer, host: str, seconds: int, *extra: str) -> dict[str, Any]:
    result = client.run(["iperf3", "-c", host, "-p", str(IPERF_PORT), "-t", str(seconds),
                         "-O", "1", "-J", *extra], timeout=seconds + 60)
    data: dict[str, Any] = json.loads(result.stdout or "{}")
    if result.returncode != 0 or "error" in data:
        raise RuntimeError(f"iperf3 to {host} failed: {data.get('error') or result.stderr}")
    return data


def gbps(data: dict[str, Any], key: str = "sum_received") -> float:
    return float(data["end"][key]["bits_per_second"]) / 1e9


def throughput(sb: Sandbox, vm: SandboxVm, args: argparse.Namespace) -> tuple[Rate, Rate]:
    samples: dict[tuple[str, str], list[float]] = {}
    for run in range(args.runs):
        progress(f"  iperf3 round {run + 1}/{args.runs}")
        for streams in ("1", "4"):
            for path, host in (("forward", "127.0.0.1"), ("direct", vm.ip)):
                figure = gbps(iperf(sb.host, host, args.seconds, "-P", streams))
                samples.setdefault((streams, path), []).append(figure)

    def rate(streams: str) -> Rate:
        return Rate(statistics.median(samples[(streams, "forward")]),
                    statistics.median(samples[(streams, "direct")]))
    return rate("1"), rate("4")


def bidir(sb: Sandbox, vm: SandboxVm, seconds: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    for path, host in (("forward", "127.0.0.1"), ("direct", vm.ip)):
        data = iperf(sb.host, host, seconds, "--bidir")
        figures[f"{path}_up"] = gbps(data, "sum_received")
        figures[f"{path}_down"] = gbps(data, "sum_received_bidir_reverse")
    return figures


def _serve_one_byte(listener: socket.socket, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with conn, contextlib.suppress(OSError):
            conn.sendall(b"!")


def _connections(host: str, count: int) -> float:
    t0 = time.perf_counter()
    for _ in range(count):
        with socket.create_connection((host, CONN_PORT), timeout=5) as sock:
            if sock.recv(1) != b"!":
                raise RuntimeError(f"no answer from {host}:{CONN_PORT}")
    return count / (time.perf_counter() - t0)


def connection_rate(sb: Sandbox, vm: SandboxVm, count: int) -> Rate:
    """Connections per second through the forward and directly."""
    listener = vm.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", CONN_PORT))
    listener.listen(256)
    listener.settimeout(0.2)
    stop = threading.Event()
    server = threading.Thread(target=_serve_one_byte, args=(listener, stop), daemon=True)
    server.start()
    try:
        wait_until(lambda: forwarding(sb, CONN_PORT), "the connection-rate forward")
        with NetnsExecutor(sb.host_netns) as host:
            forward = host.call(_connections, "127.0.0.1", count)
            direct = host.call(_connections, vm.ip, count)
    finally:
        stop.set()
        server.join(timeout=5)
        listener.close()
    return Rate(forward, direct)


def dial_cost(vm: SandboxVm, count: int = 400) -> tuple[float, float]:
    """Engine-thread cost of one dial into the VM (us): from the pool, and synchronous.
    The target listens and is never accepted from: only the dial is measured."""
    listener = vm.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", DIAL_PORT))
    listener.listen(2 * count + 16)
    costs: list[float] = []
    for pool_size in (8, 0):
        queued: deque[Callable[[], object]] = deque()
        dialer = VmDialer(vm.netns, queued.append, NAMESPACES, pool_size)
        spent = 0.0
        try:
            for _ in range(count):
                while queued:                    # refills, as the engine would run them
                    queued.popleft()()
                t0 = time.perf_counter()
                sock = dialer.tcp(("127.0.0.1", DIAL_PORT))
                spent += time.perf_counter() - t0
                sock.close()
                time.sleep(0.0002)               # let the refill thread run
        finally:
            dialer.close()
        costs.append(spent / count * 1e6)
    listener.close()
    return costs[0], costs[1]


# -- the run -----------------------------------------------------------------------------


def setup(sb: Sandbox) -> tuple[SandboxVm, Daemon]:
    """The network, the daemon, ``vm00`` with an iperf3 server (forwarded)."""
    progress(f"sandbox {sb.host_netns}, state {sb.state_dir}")
    sb.service.create_network(NETWORK, "nat")
    daemon = start_daemon(sb)
    vm = sb.vm("vm00", NETWORK)
    vm.popen(["iperf3", "-s", "-p", str(IPERF_PORT)])
    daemon.wait(lambda: forwarding(sb, IPERF_PORT), "the iperf3 forward")
    return vm, daemon


def run(args: argparse.Namespace) -> Results:
    sb = Sandbox()
    daemon: Daemon | None = None
    try:
        vm, daemon = setup(sb)
        progress(f"idle cost with 1 VM ({args.idle_seconds} s)")
        idle_one = cpu_percent(daemon.proc.pid, args.idle_seconds)
        progress(f"creating {args.vms - 1} more VMs")
        for i in range(1, args.vms):
            sb.vm(f"vm{i:02d}", NETWORK)
        time.sleep(2.0)                          # every VM opened, the first full dumps done
        progress(f"idle cost with {args.vms} VMs ({args.idle_seconds} s)")
        idle_all = cpu_percent(daemon.proc.pid, args.idle_seconds)
        progress(f"detection: {args.trials} trials")
        listen, close = detection(sb, vm, args.trials, args.bind)
        progress(f"connections: {args.conns} each way, dial costs")
        pool_us, sync_us = dial_cost(vm)
        conns = connection_rate(sb, vm, args.conns)
        progress(f"iperf3: {args.runs} rounds, {args.seconds} s each")
        one, four = throughput(sb, vm, args)
        both = bidir(sb, vm, args.seconds)
        return Results(args.vms, idle_one, idle_all, listen, close, one, four, both, conns,
                       pool_us, sync_us)
    finally:
        progress("closing the sandbox")
        if daemon is not None:
            daemon.stop()
        sb.close()


def print_table(r: Results) -> None:
    wsl = f"baseline: WSL polls every {WSL_POLL_S:g} s, ~{WSL_POLL_S * 500:.0f} ms p50"
    print(f"{'detection':<34}{'n':>5}{'p50':>9}{'p99':>9}{'max':>9}   (ms)")
    for label, lat in (("listen() -> host connect", r.listen),
                       ("close() -> host refuses", r.close)):
        print(f"{label:<34}{lat.n:>5}{lat.p50_ms:>9.1f}{lat.p99_ms:>9.1f}{lat.max_ms:>9.1f}"
              f"   goal p50 <= {GOAL_P50_MS:g}, p99 <= {GOAL_P99_MS:g}; {wsl}")
    print()
    for label, rate in (("iperf3, 1 stream", r.one_stream_gbps),
                        ("iperf3, 4 streams", r.four_streams_gbps)):
        print(f"{label:<34}forward {rate.forward:6.2f} Gbit/s, baseline direct "
              f"{rate.direct:6.2f} Gbit/s = {rate.ratio:.2f}x   goal >= {GOAL_RATIO:g}x")
    b = r.bidir_gbps
    print(f"{'iperf3 --bidir (up / down)':<34}forward {b['forward_up']:.2f} / "
          f"{b['forward_down']:.2f} Gbit/s, baseline direct {b['direct_up']:.2f} / "
          f"{b['direct_down']:.2f} Gbit/s   goal: both directions move")
    c = r.conns_per_s
    print(f"{'short connections, one at a time':<34}forward {c.forward:6.0f}/s, baseline "
          f"direct {c.direct:6.0f}/s = {c.ratio:.2f}x")
    print(f"{'dial into the VM (engine thread)':<34}pool {r.dial_pool_us:.1f} us, "
          f"synchronous executor call {r.dial_sync_us:.1f} us")
    print(f"{'idle daemon CPU':<34}{r.vms} VMs {r.idle_all_percent:.2f} % of a core, "
          f"baseline 1 VM {r.idle_one_percent:.2f} %   goal <= {GOAL_IDLE_PERCENT:g} %")
    print()
    print(f"{'goal':<44}{'value':>10}{'goal':>10}  result")
    for name, value, goal, met in r.goals():
        print(f"{name:<44}{value:>10.2f}{goal:>10}  {'PASS' if met else 'MISS'}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--vms", type=positive_int, default=20, help="VMs (default %(default)s)")
    p.add_argument("--trials", type=positive_int, default=60,
                   help="detection trials (default %(default)s)")
    p.add_argument("--idle-seconds", type=positive_int, default=10,
                   help="idle CPU measurement length (default %(default)s)")
    p.add_argument("--seconds", type=positive_int, default=5,
                   help="iperf3 run length (default %(default)s)")
    p.add_argument("--runs", type=positive_int, default=3,
                   help="iperf3 rounds, median (default %(default)s)")
    p.add_argument("--conns", type=positive_int, default=500,
                   help="short connections per path (default %(default)s)")
    p.add_argument("--bind", default="127.0.0.1", choices=("127.0.0.1", "0.0.0.0"),
                   help="where the detection trials listen in the VM: 127.0.0.1 (the "
                        "relay's path, the default) or 0.0.0.0 (the kernel's; a closed "
                        "port is then refused by the VM itself at once)")
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
