"""Sandboxes for namespace-based integration tests, usable with or without pytest.

A :class:`Sandbox` is a namespace that plays the host and one that plays the outside
network, joined by a veth uplink, with a state directory of its own and an hns service
bound to both.  Nothing of it touches the namespace the tests run in::

    outside netns                 host netns                  VM netns (per VM)
    out0 198.51.100.1/24  <-->  up0 198.51.100.2/24          eth0 172.16.x.y/20
         2001:db8:100::1/64          2001:db8:100::2/64       (made by hns)
                                 default via 198.51.100.1

The outside namespace has no route to the VMs' subnets: a reply reaches a VM only if
hns's NAT rewrote the packet to the uplink address.  ``close()`` removes everything,
tolerating objects that are already gone, and kills every process left in the
namespaces; ``keep()`` leaves the namespaces and the state for a person to look at.

Before it makes anything a sandbox writes an owner record (:mod:`hns.testing.records`):
if its process dies without closing it, :func:`remove_stale_sandboxes` (run at the start
of every pytest session, and by ``hnsctl gc --sandboxes``) removes it by name.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any

from hns.testing import records
from hns.testing.stale import remove_stale_sandboxes

__all__ = [
    "OUTSIDE_IP",
    "UPLINK_IP",
    "Peer",
    "Sandbox",
    "SandboxVm",
    "default_prefix",
    "leftovers",
    "live_sandboxes",
    "missing_requirements",
    "remove_stale_sandboxes",
    "set_default_prefix",
]

OUTSIDE_IP = "198.51.100.1"
UPLINK_IP = "198.51.100.2"
OUTSIDE_IP6 = "2001:db8:100::1"
UPLINK_IP6 = "2001:db8:100::2"
NETNS_PREFIX = "hnst-"
DEFAULT_TIMEOUT = 60.0

_prefix = NETNS_PREFIX
_live: set[Sandbox] = set()
_made_netns: set[str] = set()
_instances: set[str] = set()
_lock = threading.Lock()


def default_prefix() -> str:
    """The namespace name prefix of new sandboxes (``hnst-``; pytest's ``--hns-prefix``)."""
    return _prefix


def set_default_prefix(prefix: str) -> None:
    """Change it (ValueError for a prefix that could not start a namespace name)."""
    global _prefix
    _prefix = records.check_prefix(prefix)


def live_sandboxes() -> list[Sandbox]:
    """The sandboxes of this process that are neither closed nor kept."""
    with _lock:
        return list(_live)


def missing_requirements() -> str | None:
    """Why sandboxes cannot be built here, or None."""
    if os.geteuid() != 0:
        return "hns sandboxes need root (network namespaces, nftables)"
    for tool in ("ip", "nft", "nsenter"):
        if shutil.which(tool) is None:
            return f"hns sandboxes need the '{tool}' command (Debian: iproute2, nftables, " \
                   "util-linux)"
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class Peer:
    """A network namespace with helpers to run programs and open sockets in it."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self._procs: list[subprocess.Popen[Any]] = []

    def _argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside the namespace to completion; output captured as text."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", DEFAULT_TIMEOUT)
        kw.setdefault("check", False)
        return subprocess.run(self._argv(argv), **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace; killed at cleanup if still running."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        proc = subprocess.Popen(self._argv(argv), **kw)
        self._procs.append(proc)
        return proc

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM,
               proto: int = 0) -> socket.socket:
        """A socket created inside the namespace (usable from any thread)."""
        from hns.netns import run_in_netns
        return run_in_netns(self.netns, socket.socket, family, type, proto)

    def stop_processes(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired, ValueError, OSError):
                proc.communicate(timeout=10)
        self._procs.clear()


class SandboxVm(Peer):
    """A VM of the sandbox: the hns object and the helpers of :class:`Peer`."""

    def __init__(self, info: Any) -> None:
        super().__init__(info.netns)
        self.info = info
        self.name: str = info.name
        self.ip: str = str(info.ip)
        self.gateway: str = str(info.gateway)
        self.mac: str = info.mac

    def __repr__(self) -> str:
        return (f"SandboxVm({self.name!r}, network={self.info.network!r}, ip={self.ip}, "
                f"netns={self.netns!r})")


class Sandbox:
    """Host and outside namespaces, an uplink between them, a state dir, a service."""

    def __init__(self, tag: str | None = None, prefix: str | None = None) -> None:
        self.tag = tag or secrets.token_hex(3)
        self.prefix = records.check_prefix(prefix) if prefix is not None else _prefix
        self.host_netns = f"{self.prefix}{self.tag}-host"
        self.outside_netns = f"{self.prefix}{self.tag}-out"
        self.uplink_ip = UPLINK_IP
        self.outside_ip = OUTSIDE_IP
        self.uplink_ip6 = UPLINK_IP6
        self.outside_ip6 = OUTSIDE_IP6
        self.host = Peer(self.host_netns)
        self.outside = Peer(self.outside_netns)
        self.state_dir = tempfile.mkdtemp(
            prefix=f"{records.STATE_DIR_PREFIX}{self.prefix}{self.tag}-")
        self.vms: list[SandboxVm] = []
        self.vm_hooks: list[Callable[[SandboxVm], None]] = []   # called with each new VM
        self.kept = False
        self._owner_pid = os.getpid()
        self._service: Any = None
        self._instance: str | None = None
        self._record: records.OwnerRecord | None = None
        with _lock:
            _live.add(self)
        try:
            self._write_record()
            self._build()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        vms = ", ".join(vm.name for vm in self.vms)
        state = " kept" if self.kept else ""
        return (f"Sandbox({self.tag!r}{state}, host={self.host_netns!r}, "
                f"outside={self.outside_netns!r}, state_dir={self.state_dir!r}, "
                f"vms=[{vms}])")

    def _write_record(self, **changes: Any) -> None:
        """Write (or update) the owner record; a sandbox without one still works, only a
        killed run's leftovers then wait for a person to remove them."""
        try:
            if self._record is None:
                start = records.proc_start_time(os.getpid())
                if start is None:
                    raise OSError("no start time in /proc for this process")
                self._record = records.OwnerRecord(
                    prefix=self.prefix, tag=self.tag, pid=os.getpid(), start_time=start,
                    state_dir=self.state_dir, netns=(self.host_netns, self.outside_netns),
                    pidns=records.own_pidns())
            if changes:
                self._record = dataclasses.replace(self._record, **changes)
            records.write_record(self._record)
        except (OSError, ValueError) as exc:
            print(f"hns sandbox: owner record of {self.host_netns}: {exc}", file=sys.stderr)

    def _build(self) -> None:
        h, o = self.host_netns, self.outside_netns
        for ns in (h, o):
            with _lock:
                _made_netns.add(ns)
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", h, "link", "add", "up0", "type", "veth", "peer", "name", "out0", "netns", o)
        _ip("-n", h, "addr", "add", f"{UPLINK_IP}/24", "dev", "up0")
        _ip("-n", h, "addr", "add", f"{UPLINK_IP6}/64", "dev", "up0", "nodad")
        _ip("-n", o, "addr", "add", f"{OUTSIDE_IP}/24", "dev", "out0")
        _ip("-n", o, "addr", "add", f"{OUTSIDE_IP6}/64", "dev", "out0", "nodad")
        _ip("-n", h, "link", "set", "up0", "up")
        _ip("-n", o, "link", "set", "out0", "up")
        _ip("-n", h, "route", "add", "default", "via", OUTSIDE_IP)
        _ip("-n", h, "-6", "route", "add", "default", "via", OUTSIDE_IP6)

    @property
    def service(self) -> Any:
        """The hns Python API (:class:`hns.Service`) bound to this sandbox."""
        if self._service is None:
            from hns.service import Service
            self._service = Service(self.state_dir, self.host_netns)
            self._instance = self._service.instance
            if not self.kept:          # a kept sandbox's objects are meant to stay
                with _lock:
                    _instances.add(self._service.instance)
                self._write_record(instance=self._instance)
        return self._service

    def hnsctl_argv(self) -> list[str]:
        """The argv prefix of ``hnsctl`` pointed at this sandbox."""
        return [sys.executable, "-m", "hns.cli", "--state-dir", self.state_dir,
                "--host-netns", self.host_netns]

    def hnsctl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run the ``hnsctl`` CLI against this sandbox (in this process's namespace)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", DEFAULT_TIMEOUT)
        kw.setdefault("check", False)
        return subprocess.run([*self.hnsctl_argv(), *args], **kw)

    def set_host_resolv(self, text: str) -> str:
        """Write the host namespace's resolv.conf (``/etc/netns/<host_netns>/resolv.conf``,
        what hns and its DNS proxy read; ``host.run`` sees it as ``/etc/resolv.conf``);
        replaced atomically, removed by :meth:`close`.  Returns its path."""
        directory = os.path.join(_etc_netns(), self.host_netns)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "resolv.conf")
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".resolv.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return path

    def vm(self, name: str, network: str, **kw: Any) -> SandboxVm:
        """Create a VM through the service and wrap it."""
        vm = SandboxVm(self.service.create_vm(name, network, **kw))
        self.vms.append(vm)
        for hook in list(self.vm_hooks):
            hook(vm)
        return vm

    def instance(self) -> str | None:
        """The hns instance tag of the sandbox's state, once there is a state."""
        if self._instance is None and os.path.exists(os.path.join(self.state_dir, "hns.db")):
            return str(self.service.instance)
        return self._instance

    def keep(self) -> None:
        """Leave the namespaces, VMs, rules and state dir for a person to look at: only
        the processes the sandbox started stop.  The owner record stays, marked kept:
        ``hnsctl gc --sandboxes`` removes the sandbox once this process is gone."""
        for peer in [*self.vms, self.host, self.outside]:
            peer.stop_processes()
        self.instance()
        if self._service is not None:
            self._service.close()
            self._service = None
        self.kept = True
        self._write_record(kept=True, instance=self._instance)
        with _lock:
            _live.discard(self)
            _made_netns.difference_update((self.host_netns, self.outside_netns))
            if self._instance:
                _instances.discard(self._instance)

    def close(self) -> None:
        """Remove everything; safe to call twice and after partial construction."""
        if self.kept:
            return
        from hns.daemon.spawn import stop_spawned
        stop_spawned(self.state_dir)          # the daemon 'hnsctl up' started, by its pid
        for peer in [*self.vms, self.host, self.outside]:
            peer.stop_processes()
        if self._service is not None or os.path.exists(os.path.join(self.state_dir, "hns.db")):
            self._remove_objects()
        self._remove_namespaces()
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if self._record is not None:
            records.remove_record(self._record)
        with _lock:
            _live.discard(self)

    def _remove_objects(self) -> None:
        try:
            svc = self.service
            for vm in svc.list_vms():
                svc.delete_vm(vm.name)
            for net in svc.list_networks():
                svc.delete_network(net.name, force=True)
            svc.gc()
        except Exception as exc:  # keep cleaning; leftovers() reports what stays
            print(f"hns sandbox: cleanup of {self.state_dir}: {exc}", file=sys.stderr)
        finally:
            if self._service is not None:
                self._service.close()
                self._service = None

    def _remove_namespaces(self) -> None:
        from hns.kernel import kill_netns_processes
        from hns.netns import delete_netns, list_netns
        for ns in (self.host_netns, self.outside_netns):
            kill_netns_processes(ns)
            delete_netns(ns)
            shutil.rmtree(os.path.join(_etc_netns(), ns), ignore_errors=True)
        if self._instance:
            from hns.naming import netns_prefix
            from hns.resolv import remove_vm_resolv
            for ns in list_netns():
                if ns.startswith(netns_prefix(self._instance)):
                    kill_netns_processes(ns)
                    delete_netns(ns)
                    remove_vm_resolv(ns)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _etc_netns() -> str:
    from hns.resolv import ETC_NETNS
    return ETC_NETNS


def leftovers() -> list[str]:
    """What sandboxes made in this process and did not remove."""
    from hns.naming import netns_prefix
    from hns.netns import list_netns
    from hns.resolv import ETC_NETNS
    existing = set(list_netns())
    with _lock:
        prefixes = tuple(netns_prefix(i) for i in _instances)
        found = [f"netns {ns}" for ns in sorted(_made_netns & existing)]
        found += [f"{ETC_NETNS}/{ns}" for ns in sorted(_made_netns)
                  if os.path.exists(os.path.join(ETC_NETNS, ns))]
    if prefixes:
        found += [f"netns {ns}" for ns in sorted(existing) if ns.startswith(prefixes)]
        with contextlib.suppress(FileNotFoundError):
            found += [f"{ETC_NETNS}/{d}" for d in sorted(os.listdir(ETC_NETNS))
                      if d.startswith(prefixes)]
    with _lock:
        found += [f"sandbox state dir {s.state_dir}" for s in _live]
    return found


@atexit.register
def _close_all() -> None:
    for sandbox in list(_live):
        if sandbox._owner_pid == os.getpid():     # not in a forked child that exits
            sandbox.close()
