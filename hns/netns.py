"""The one namespace primitive of hns.

Theory of operation: ``setns(2)`` with ``CLONE_NEWNET`` changes the network namespace of
the calling *thread* only, and a socket stays in the namespace it was created in.  So
work in another namespace runs on a dedicated thread that entered it: a
:class:`NetnsExecutor` owns one such thread for as long as it lives, and everything that
opens sockets (pyroute2 included, whose sockets are per thread) runs on it.  The calling
thread, and any event loop thread, never changes namespace.

Named namespaces follow the iproute2 convention: a bind mount of the namespace file under
``/run/netns/NAME``, with ``/run/netns`` made a shared mount so the name is visible from
every mount namespace (``ip netns exec`` relies on it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from hns.errors import KernelError

__all__ = [
    "NAMESPACES",
    "NETNS_DIR",
    "NetnsExecutor",
    "create_netns",
    "delete_netns",
    "enter_netns",
    "list_netns",
    "netns_exists",
    "netns_inode",
    "netns_mounted",
    "netns_path",
    "run_in_netns",
]

T = TypeVar("T")

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
MS_REC = 0x4000
MS_BIND = 0x1000
MS_SHARED = 1 << 20
MNT_DETACH = 2
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), Linux 4.11

_libc = ctypes.CDLL(None, use_errno=True)
_rundir_lock = threading.Lock()
_rundir_ready = False


def _check(ret: int, what: str, name: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise KernelError(f"{what} {name}: {os.strerror(err)}", err)


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def netns_mounted(name: str) -> bool:
    """True when ``/run/netns/NAME`` is a mounted network namespace, not merely a file.

    The name must be on nsfs (the same device as this process's own namespace files; a
    plain file, a directory or a symlink is not) and the kernel must call it a network
    namespace (``NS_GET_NSTYPE``; a bind mount of, say, a mount namespace is on nsfs too).
    """
    path = netns_path(name)
    try:
        if os.lstat(path).st_dev != os.stat("/proc/self/ns/net").st_dev:
            return False
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return bool(fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET)
    except OSError as exc:
        return exc.errno == errno.ENOTTY  # a kernel before 4.11: nsfs is all we can tell
    finally:
        os.close(fd)


def netns_inode(name: str | None) -> tuple[int, int]:
    """(st_dev, st_ino) of a named namespace, or of this process's when ``name`` is None."""
    st = os.stat(netns_path(name) if name else "/proc/self/ns/net")
    return st.st_dev, st.st_ino


def netns_pids(names: Iterable[str]) -> dict[str, list[int]]:
    """The processes (thread group leaders, as /proc lists them) inside each named
    namespace, found in one pass over /proc; a namespace that does not exist is left
    out."""
    wanted: dict[tuple[int, int], str] = {}
    for name in names:
        with contextlib.suppress(OSError):
            st = os.stat(netns_path(name))
            wanted[(st.st_dev, st.st_ino)] = name
    found: dict[str, list[int]] = {name: [] for name in wanted.values()}
    if not wanted:
        return found
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            holder = wanted.get((st.st_dev, st.st_ino))
            if holder is not None:
                found[holder].append(int(entry))
    return found


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _enter(name: str) -> None:
    try:
        fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KernelError(f"network namespace {name} does not exist", errno.ENOENT) from None
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), "cannot enter network namespace", name)
    finally:
        os.close(fd)


def enter_netns(name: str) -> None:
    """Move the calling thread into ``name``.  Only for a process's main thread before it
    starts any other (threads made later inherit it): the daemon does this once at start."""
    _enter(name)


def _prepare_rundir() -> None:
    """Make /run/netns a shared mount, as iproute2 does, once per process."""
    global _rundir_ready
    with _rundir_lock:
        if _rundir_ready:
            return
        os.makedirs(NETNS_DIR, mode=0o755, exist_ok=True)
        d = NETNS_DIR.encode()
        if _libc.mount(b"none", d, b"none", MS_SHARED | MS_REC, None) != 0:
            _check(_libc.mount(d, d, b"none", MS_BIND | MS_REC, None), "cannot bind", NETNS_DIR)
            _check(_libc.mount(b"none", d, b"none", MS_SHARED | MS_REC, None), "cannot share",
                   NETNS_DIR)
        _rundir_ready = True


def _in_thread(fn: Callable[[], T]) -> T:
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result()


def create_netns(name: str) -> None:
    """Create the named namespace; KernelError(EEXIST) when the name is taken."""
    _prepare_rundir()
    path = netns_path(name)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    except FileExistsError:
        raise KernelError(f"network namespace {name} already exists", errno.EEXIST) from None

    def make() -> None:
        _check(_libc.unshare(CLONE_NEWNET), "cannot create network namespace", name)
        _check(_libc.mount(b"/proc/thread-self/ns/net", path.encode(), b"none", MS_BIND, None),
               "cannot mount network namespace", name)

    try:
        _in_thread(make)
    except BaseException:
        os.unlink(path)
        raise


def delete_netns(name: str) -> bool:
    """Remove the name; True if it existed.  Processes inside keep the namespace alive."""
    path = netns_path(name)
    if not os.path.exists(path):
        return False
    _libc.umount2(path.encode(), MNT_DETACH)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


class NetnsExecutor:
    """A thread that lives in one network namespace and runs callables there.

    ``name=None`` means the namespace of this process: callables then run on the
    executor's thread without any setns.
    """

    def __init__(self, name: str | None) -> None:
        self.name = name
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"netns-{name}",
            initializer=(lambda: _enter(name)) if name else None)

    def call(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return self._pool.submit(fn, *args).result()
        except Exception as exc:
            if "initializer" in str(exc) and self.name and not netns_exists(self.name):
                raise KernelError(f"network namespace {self.name} does not exist",
                                  errno.ENOENT) from None
            raise

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        """Run ``fn(*args)`` in the namespace without waiting; its future."""
        return self._pool.submit(fn, *args)

    @property
    def local(self) -> threading.local:
        """Per-thread storage, meant for objects only the executor's thread may use."""
        return self._local

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> NetnsExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_in_netns(name: str | None, fn: Callable[..., T], *args: object) -> T:
    """Run ``fn(*args)`` on a short-lived thread inside namespace ``name``."""
    with NetnsExecutor(name) as ex:
        return ex.call(fn, *args)


class _Namespaces:
    """:class:`portproxy.namespaces.Namespaces` by this module's primitives."""

    def executor(self, netns: str | None) -> NetnsExecutor:
        return NetnsExecutor(netns)

    def inode(self, netns: str | None) -> tuple[int, int]:
        return netns_inode(netns)


NAMESPACES = _Namespaces()
