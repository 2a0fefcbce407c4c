"""Clusters of emulated hosts for multi-host integration tests.

N sandboxes (:class:`hns.testing.Sandbox`, one per host: "a", "b", ...) on an underlay,
and a real etcd cluster with one member in each host's namespace::

    underlay netns <prefix><tag>-cl-ul           host netns of host i (its sandbox)
    br0 192.168.250.1/24  port ul-<name> <-->  ul0 192.168.250.(10+i)/24 (i from 1)
                                               etcd <name>: clients :2379, peers :2380
                                               up0 198.51.100.2/24, default via the outside

The hosts' default routes stay the sandboxes' (via the outside).  ``ClusterHost.hnsctl``
and the host's daemon get ``HNS_CLUSTER`` (all members' client URLs), ``HNS_HOST_NAME``
and, with ``ttl``, ``HNS_CLUSTER_TTL`` in their environment.

``close()`` stops what the cluster started, by its own ``Popen`` (daemons, members),
deletes the underlay namespace (the veths go with it), closes the sandboxes and removes
the temp dir (etcd data and logs); it tolerates objects already gone (a host
``remove()``d) and runs when the construction fails half way.  An owner record
(:mod:`hns.testing.records`) names the underlay and the temp dir, so a killed run's
leftovers go with ``remove_stale_sandboxes`` (the members die with the hosts'
namespaces, which the sandboxes' records name).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import string
import subprocess
import sys
import tempfile
import threading
from typing import Any

from hns.kernel import kill_netns_processes
from hns.netns import delete_netns
from hns.testing import Sandbox, missing_requirements, records
from hns.testing.daemon import HnsDaemon
from hns.testing.wait import wait_until

__all__ = ["BRIDGE", "ETCD_BIN", "HOST_LINK", "MAX_HOSTS", "UNDERLAY_GATEWAY", "Cluster",
           "ClusterHost", "Etcd", "cluster_requirements", "host_address", "host_names"]

UNDERLAY_NET = "192.168.250"
UNDERLAY_GATEWAY = f"{UNDERLAY_NET}.1"      # the underlay bridge's own address
PREFIXLEN = 24
BRIDGE = "br0"
HOST_LINK = "ul0"
MTU = "1500"
MAX_HOSTS = len(string.ascii_lowercase)
ETCD_BIN = "/usr/bin/etcd"
CLIENT_PORT, PEER_PORT = 2379, 2380
HEALTH_TIMEOUT = 30.0            # s for the members to report healthy
ETCD_TIMINGS = ("--heartbeat-interval", "100", "--election-timeout", "500")

_open: set[Cluster] = set()
_lock = threading.Lock()


def host_names(count: int) -> list[str]:
    """The names of the hosts of a cluster of ``count``: "a", "b", ..."""
    if not 1 <= count <= MAX_HOSTS:
        raise ValueError(f"a cluster has 1 to {MAX_HOSTS} hosts, not {count}")
    return list(string.ascii_lowercase[:count])


def host_address(index: int) -> str:
    """The underlay address of host ``index`` (from 1): 192.168.250.(10+index)."""
    return f"{UNDERLAY_NET}.{10 + index}"


def cluster_requirements() -> str | None:
    """Why clusters cannot be built here, or None."""
    missing = [t for t in ("ping", "setpriv", "env", ETCD_BIN, "etcdctl") if not shutil.which(t)]
    return missing_requirements() or (
        f"clusters need {', '.join(missing)} (Debian: etcd-server, etcd-client, "
        "iputils-ping, util-linux)" if missing else None)


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _warn(what: str, exc: BaseException) -> None:
    print(f"hns cluster: {what}: {exc}", file=sys.stderr)


def _clean_env(prefix: str) -> dict[str, str]:
    """This process's environment without the ``<prefix>_*`` settings of a caller."""
    return {k: v for k, v in os.environ.items() if not k.startswith(f"{prefix}_")}


class Etcd:
    """The etcd members of a cluster, one per host, each in its host's namespace.

    Members are processes this object started: ``kill`` and ``start`` act on their own
    ``Popen`` only.  ``etcdctl`` runs inside a host's namespace (:meth:`ctl`).  The data
    dirs (``<name>.etcd``) and logs (``<name>.log``) are in ``workdir``."""

    def __init__(self, hosts: list[ClusterHost], workdir: str, token: str,
                 etcd_bin: str = ETCD_BIN) -> None:
        self.hosts = {h.name: h for h in hosts}
        self.workdir, self.token, self.etcd_bin = workdir, token, etcd_bin
        self.procs: dict[str, subprocess.Popen[Any]] = {}

    @property
    def urls(self) -> str:
        """The client URLs of all members (removed hosts' too), comma-joined."""
        return ",".join(self.client_url(name) for name in self.hosts)

    def client_url(self, name: str) -> str:
        return f"http://{self.hosts[name].address}:{CLIENT_PORT}"

    def _peer_url(self, name: str) -> str:
        return f"http://{self.hosts[name].address}:{PEER_PORT}"

    def log_path(self, name: str) -> str:
        return os.path.join(self.workdir, f"{name}.log")

    def _argv(self, name: str, state: str) -> list[str]:
        client, peer = self.client_url(name), self._peer_url(name)
        initial = ",".join(f"{n}={self._peer_url(n)}" for n in self.hosts)
        return [shutil.which("setpriv") or "setpriv", "--pdeathsig", "KILL", "--",
                self.etcd_bin, "--name", name,
                "--data-dir", os.path.join(self.workdir, f"{name}.etcd"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", initial, "--initial-cluster-state", state,
                "--initial-cluster-token", self.token, *ETCD_TIMINGS,
                "--logger", "zap", "--log-outputs", "stderr"]

    def _spawn(self, name: str, state: str) -> None:
        host = self.hosts[name]
        with open(self.log_path(name), "ab") as log:
            self.procs[name] = host.sandbox.host.popen(
                self._argv(name, state), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, text=False, start_new_session=True,
                env=_clean_env("ETCD"))

    def start_all(self, timeout: float = HEALTH_TIMEOUT) -> None:
        """Start every member (a new cluster) and wait until all report healthy."""
        for name in self.hosts:
            self._spawn(name, "new")
        self.wait_healthy(timeout=timeout)

    def start(self, name: str, wait: bool = True, timeout: float = 15.0) -> None:
        """Restart member ``name`` with its data dir (``--initial-cluster-state
        existing``); with ``wait``, until its client port accepts connections (healthy
        takes a quorum: :meth:`wait_healthy`)."""
        self.hosts[name]._check_present()
        if self.running(name):
            raise RuntimeError(f"etcd member {name} is running already")
        self._spawn(name, "existing")
        if wait:
            wait_until(lambda: self._listening(name), timeout=timeout,
                       what=f"etcd member {name} to listen")

    def _listening(self, name: str) -> bool:
        self._check_alive(name)
        host = self.hosts[name]
        with host.sandbox.host.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex((host.address, CLIENT_PORT)) == 0

    def _check_alive(self, name: str) -> None:
        if not self.running(name):
            code = self.procs[name].returncode if name in self.procs else None
            raise RuntimeError(f"etcd member {name} is not running (exit {code}); its log:\n"
                               f"{self.log_tail(name)}")

    def kill(self, name: str) -> None:
        """SIGKILL member ``name`` and wait for it (nothing if it is not running)."""
        self.hosts[name]                      # KeyError for a name not in the cluster
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()

    def running(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def pids(self) -> dict[str, int]:
        """The pids of the running members, by host name."""
        return {name: p.pid for name, p in self.procs.items() if p.poll() is None}

    def ctl(self, *args: str, via: str | None = None,
            timeout: float = 5.0) -> subprocess.CompletedProcess[str]:
        """``etcdctl *args`` (API 3): with ``via``, through that member only, inside its
        host's namespace; else through all members, from the first host present."""
        if via is not None:
            self.hosts[via]._check_present()
        return self._ctl(args, [via] if via else list(self.hosts), timeout)

    def _ctl(self, args: tuple[str, ...], names: list[str],
             timeout: float) -> subprocess.CompletedProcess[str]:
        """Through the members ``names``, from the first of their hosts present."""
        hosts = [self.hosts[n] for n in [*names, *self.hosts] if not self.hosts[n].removed]
        if not hosts:
            raise RuntimeError("every host of the cluster was removed")
        argv = ["etcdctl", f"--endpoints={','.join(map(self.client_url, names))}",
                f"--dial-timeout={timeout:g}s", f"--command-timeout={timeout:g}s", *args]
        return hosts[0].run(argv, env={**_clean_env("ETCDCTL"), "ETCDCTL_API": "3"},
                            timeout=2 * timeout + 10)

    def _json(self, args: tuple[str, ...], names: list[str],
              timeout: float) -> tuple[list[dict[str, Any]], str]:
        if not names or all(h.removed for h in self.hosts.values()):
            return [], "no member to ask"
        result = self._ctl((*args, "-w", "json"), names, timeout)
        with contextlib.suppress(ValueError):
            entries = json.loads(result.stdout)
            if isinstance(entries, list):
                return entries, result.stderr.strip()
        return [], result.stderr.strip()

    def health(self, names: list[str] | None = None, timeout: float = 2.0) -> dict[str, bool]:
        """``etcdctl endpoint health``: client URL -> healthy, for the members ``names``
        (default: all; a member down costs ``timeout``)."""
        names = list(self.hosts) if names is None else names
        found = dict.fromkeys(map(self.client_url, names), False)
        for entry in self._json(("endpoint", "health"), names, timeout)[0]:
            if entry.get("endpoint") in found:
                found[entry["endpoint"]] = entry.get("health") is True
        return found

    def wait_healthy(self, names: list[str] | None = None,
                     timeout: float = HEALTH_TIMEOUT) -> None:
        """Until the members ``names`` (default: the present hosts') report healthy;
        RuntimeError with the tails of their logs if they do not within ``timeout``."""
        want = names or [n for n, h in self.hosts.items() if not h.removed]

        def healthy() -> bool:
            for name in want:
                self._check_alive(name)
            return all(self.health(want).values())
        try:
            wait_until(healthy, timeout=timeout, interval=0.2,
                       what=f"etcd members {', '.join(want)} to be healthy")
        except TimeoutError as exc:
            logs = "\n".join(f"--- {n}.log\n{self.log_tail(n)}" for n in want)
            raise RuntimeError(f"{exc}: {self.health(want)}\n{logs}") from None

    def leader(self, timeout: float = 2.0) -> str:
        """The host name of the current leader as the running members see it (the one
        of the highest raft term); LookupError if none is known."""
        up = [n for n in self.hosts if self.running(n)]
        entries, err = self._json(("endpoint", "status"), up, timeout)
        by_id = {e["Status"]["header"]["member_id"]: e["Endpoint"] for e in entries}
        by_url = {self.client_url(name): name for name in self.hosts}
        for entry in sorted(entries, key=lambda e: -int(e["Status"].get("raftTerm", 0))):
            if entry["Status"].get("leader") in by_id:
                return by_url[by_id[entry["Status"]["leader"]]]
        raise LookupError(f"no etcd leader known to the members {up}: {err[-300:]}")

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            with open(self.log_path(name), errors="replace") as f:
                return "".join(f.readlines()[-lines:]).rstrip("\n")
        except OSError as exc:
            return f"(no log: {exc})"


class ClusterHost:
    """One host of a cluster: its sandbox, underlay address, CLI and daemon.  It stands
    in for the sandbox of :class:`hns.testing.daemon.HnsDaemon` (``hnsctl_argv``,
    ``hnsctl``, ``state_dir``, ``tag``, ``host_netns``): the daemon gets :meth:`env`."""

    def __init__(self, cluster: Cluster, index: int, name: str, sandbox: Sandbox) -> None:
        self.cluster, self.index, self.name, self.sandbox = cluster, index, name, sandbox
        self.netns = self.host_netns = sandbox.host_netns
        self.tag = sandbox.tag
        self.state_dir = sandbox.state_dir
        self.address = host_address(index)
        self.removed = False
        self.daemon: HnsDaemon | None = None

    def __repr__(self) -> str:
        gone = " removed" if self.removed else ""
        return f"ClusterHost({self.name!r}{gone}, netns={self.netns!r}, {self.address})"

    def env(self) -> dict[str, str]:
        """What the cluster adds to the environment of this host's ``hnsctl``."""
        env = {"HNS_HOST_NAME": self.name}
        if self.cluster.has_etcd:
            env["HNS_CLUSTER"] = self.cluster.etcd.urls
        if self.cluster.ttl is not None:
            env["HNS_CLUSTER_TTL"] = str(self.cluster.ttl)
        return env

    def hnsctl_argv(self) -> list[str]:
        """The argv prefix of ``hnsctl`` for this host, the environment set by ``env``."""
        assigns = [f"{key}={value}" for key, value in self.env().items()]
        return [shutil.which("env") or "env", *assigns, *self.sandbox.hnsctl_argv()]

    def hnsctl(self, *args: str, env: dict[str, str] | None = None,
               **kw: Any) -> subprocess.CompletedProcess[Any]:
        """The sandbox's ``hnsctl`` with :meth:`env` (and ``env``, on top) added to this
        process's environment."""
        return self.sandbox.hnsctl(*args, env={**os.environ, **self.env(), **(env or {})},
                                   **kw)

    def run(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` in the host namespace (:meth:`hns.testing.Peer.run`)."""
        return self.sandbox.host.run(argv, **kw)

    def ping(self, address: str, count: int = 1, wait: int = 2) -> bool:
        """Whether ``ping`` from this host gets an answer from ``address``."""
        result = self.run(["ping", "-n", "-q", "-c", str(count), "-W", str(wait), address])
        return result.returncode == 0

    def start_daemon(self, *extra: str, timeout: float = 30.0) -> HnsDaemon:
        """Start ``hnsctl daemon *extra`` for this host and wait until it answers."""
        self._check_present()
        if self.daemon is not None and self.daemon.running:
            raise RuntimeError(f"the daemon of host {self.name} is running already")
        self.daemon = HnsDaemon(self, *extra)
        return self.daemon.start(timeout=timeout)

    def stop_daemon(self) -> int | None:
        """SIGTERM and wait; its exit code (None if none was started)."""
        return self.daemon.stop() if self.daemon is not None else None

    def kill_daemon(self) -> None:
        """SIGKILL the daemon, if one runs."""
        if self.daemon is not None:
            self.daemon.kill()

    def remove(self) -> None:
        """The host is gone: its daemon and etcd member SIGKILLed, its namespaces and
        state removed.  The rest of the cluster keeps working; ``close`` skips it."""
        if self.removed:
            return
        self.removed = True
        self.kill_daemon()
        if self.cluster.has_etcd:
            self.cluster.etcd.kill(self.name)
        self.sandbox.close()

    def _check_present(self) -> None:
        if self.removed:
            raise RuntimeError(f"host {self.name} was removed")


class Cluster:
    """N hosts on an underlay with an etcd member each; a context manager."""

    def __init__(self, hosts: int = 3, *, etcd: bool = True, ttl: int | None = None,
                 prefix: str | None = None, etcd_bin: str = ETCD_BIN,
                 health_timeout: float = HEALTH_TIMEOUT) -> None:
        """``hosts``: 1 to 26; ``etcd=False``: hosts and underlay only; ``ttl``:
        ``HNS_CLUSTER_TTL``; ``prefix``: of the namespace names (default: the sandboxes');
        ``health_timeout``: for the new members to report healthy."""
        names = host_names(hosts)
        if ttl is not None and ttl <= 0:
            raise ValueError(f"ttl {ttl}: a positive number of seconds")
        self.ttl = ttl
        self.hosts: list[ClusterHost] = []
        self.underlay_netns: str | None = None
        self.workdir: str | None = None
        self._etcd: Etcd | None = None
        self._record: records.OwnerRecord | None = None
        self._owner_pid = os.getpid()
        with _lock:
            _open.add(self)
        try:
            self._build(names, prefix)
            if etcd:
                self._etcd = Etcd(self.hosts, self.workdir or "",
                                  token=f"hns-{self.underlay_netns}-{secrets.token_hex(4)}",
                                  etcd_bin=etcd_bin)
                self._etcd.start_all(timeout=health_timeout)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"Cluster({[h.name for h in self.hosts]}, underlay={self.underlay_netns!r})"

    @property
    def has_etcd(self) -> bool:
        return self._etcd is not None

    @property
    def etcd(self) -> Etcd:
        """The etcd members (RuntimeError for a cluster made with ``etcd=False``)."""
        if self._etcd is None:
            raise RuntimeError("this cluster has no etcd (made with etcd=False)")
        return self._etcd

    def __getitem__(self, name: str) -> ClusterHost:
        """The host ``name`` (KeyError if there is none)."""
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(f"no host {name!r} in {[h.name for h in self.hosts]}")

    def namespaces(self) -> list[str]:
        """Every namespace name the cluster made (removed hosts' included)."""
        names = [ns for h in self.hosts for ns in (h.sandbox.host_netns,
                                                   h.sandbox.outside_netns)]
        return names + ([self.underlay_netns] if self.underlay_netns else [])

    # --- building ------------------------------------------------------------------------

    def _build(self, names: list[str], prefix: str | None) -> None:
        for index, name in enumerate(names, start=1):
            self.hosts.append(ClusterHost(self, index, name, Sandbox(prefix=prefix)))
        first = self.hosts[0].sandbox
        tag = f"{first.tag}-cl"
        self.workdir = tempfile.mkdtemp(
            prefix=f"{records.STATE_DIR_PREFIX}{first.prefix}{tag}-")
        self.underlay_netns = f"{first.prefix}{tag}-ul"
        self._write_record(first.prefix, tag)
        self._build_underlay(self.underlay_netns)

    def _write_record(self, prefix: str, tag: str) -> None:
        """The owner record (without one, a killed run's underlay waits for a person)."""
        assert self.workdir is not None and self.underlay_netns is not None
        try:
            start = records.proc_start_time(os.getpid())
            if start is None:
                raise OSError("no start time in /proc for this process")
            self._record = records.OwnerRecord(
                prefix=prefix, tag=tag, pid=os.getpid(), start_time=start,
                state_dir=self.workdir, netns=(self.underlay_netns,),
                pidns=records.own_pidns())
            records.write_record(self._record)
        except (OSError, ValueError) as exc:
            self._record = None
            _warn(f"owner record of {self.underlay_netns}", exc)

    def _build_underlay(self, ul: str) -> None:
        _ip("netns", "add", ul)
        _ip("-n", ul, "link", "set", "lo", "up")
        _ip("-n", ul, "link", "add", BRIDGE, "mtu", MTU, "type", "bridge")
        _ip("-n", ul, "addr", "add", f"{UNDERLAY_GATEWAY}/{PREFIXLEN}", "dev", BRIDGE)
        _ip("-n", ul, "link", "set", BRIDGE, "up")
        for host in self.hosts:
            port = f"ul-{host.name}"
            _ip("-n", host.netns, "link", "add", HOST_LINK, "mtu", MTU, "type", "veth",
                "peer", "name", port, "mtu", MTU, "netns", ul)
            _ip("-n", ul, "link", "set", port, "master", BRIDGE)
            _ip("-n", ul, "link", "set", port, "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/{PREFIXLEN}",
                "dev", HOST_LINK)
            _ip("-n", host.netns, "link", "set", HOST_LINK, "up")

    # --- removing ------------------------------------------------------------------------

    def close(self) -> None:
        """Remove everything; safe to call twice and after partial construction."""
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.kill_daemon()
        if self._etcd is not None:
            try:
                for name in self._etcd.procs:
                    self._etcd.kill(name)
            except Exception as exc:     # keep cleaning
                _warn("stopping etcd", exc)
        if self.underlay_netns is not None:
            try:
                kill_netns_processes(self.underlay_netns)   # none of ours: still ours
                delete_netns(self.underlay_netns)
            except Exception as exc:
                _warn(f"deleting {self.underlay_netns}", exc)
        for host in self.hosts:
            if not host.removed:
                try:
                    host.sandbox.close()
                except Exception as exc:
                    _warn(f"closing the sandbox of host {host.name}", exc)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._record is not None:
            records.remove_record(self._record)
        with _lock:
            _open.discard(self)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _close_all() -> None:           # registered after the sandboxes': runs before theirs
    for cluster in list(_open):
        if cluster._owner_pid == os.getpid():
            cluster.close()
