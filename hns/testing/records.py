"""Owner records of sandboxes: who made one, what it is called, whether its owner lives.

Every :class:`~hns.testing.sandbox.Sandbox` writes one JSON file in :data:`RECORDS_DIR`
(``/run/hns-sandboxes``, a tmpfs like ``/run/netns``: records and namespaces are gone
together at boot) before it makes anything, and removes it when it is closed.  A record
names the owning process by its pid *and* its start time (field 22 of ``/proc/PID/stat``),
so a pid reused by another process does not pass for the owner.  A record whose owner is
gone describes a stale sandbox (:mod:`hns.testing.stale` removes it by the names in it).

The parsing, the names a record may claim and the staleness decision are pure; the few
functions at the end read and write the files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

__all__ = [
    "RECORDS_DIR",
    "STATE_DIR_PREFIX",
    "OwnerRecord",
    "check_prefix",
    "own_pidns",
    "owner_state",
    "parse_stat_start_time",
    "proc_start_time",
    "read_records",
    "record_path",
    "records_dir",
    "records_lock",
    "remove_record",
    "write_record",
]

RECORDS_DIR = "/run/hns-sandboxes"
RECORDS_ENV = "HNS_SANDBOX_RECORDS"          # another directory (for tests of this module)
STATE_DIR_PREFIX = "hns-sandbox-"            # the basename of every sandbox state dir
VERSION = 1
PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,23}")
TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
INSTANCE_RE = re.compile(r"[0-9a-f]{1,16}")


def check_prefix(prefix: str) -> str:
    """A namespace name prefix for sandboxes: letters, digits, ``_.-``, at most 24
    characters, starting with a letter or digit.  Raises ValueError naming the rule."""
    if not PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"invalid sandbox prefix {prefix!r}: use 1-24 letters, digits, "
                         "'_', '.' or '-', starting with a letter or digit")
    return prefix


@dataclass(frozen=True)
class OwnerRecord:
    """One sandbox: its owner (pid, start time, pid namespace) and its names."""

    prefix: str
    tag: str
    pid: int
    start_time: int
    state_dir: str
    netns: tuple[str, ...] = ()
    instance: str | None = None
    kept: bool = False
    pidns: int | None = None

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        if not TAG_RE.fullmatch(self.tag):
            raise ValueError(f"invalid sandbox tag {self.tag!r}")
        if self.pid <= 0 or self.start_time < 0:
            raise ValueError(f"invalid owner pid {self.pid} / start time {self.start_time}")
        for ns in self.netns:
            if not ns.startswith(self.name_stem):
                raise ValueError(f"namespace {ns!r} is not the sandbox's ({self.name_stem}*)")
        if self.instance is not None and not INSTANCE_RE.fullmatch(self.instance):
            raise ValueError(f"invalid hns instance {self.instance!r}")
        if not os.path.basename(self.state_dir.rstrip("/")).startswith(STATE_DIR_PREFIX):
            raise ValueError(f"state dir {self.state_dir!r} is not a sandbox's")

    @property
    def name_stem(self) -> str:
        """What every namespace of the sandbox starts with: ``<prefix><tag>-``."""
        return f"{self.prefix}{self.tag}-"

    @property
    def filename(self) -> str:
        return f"{self.prefix}{self.tag}.json"

    def to_json(self) -> str:
        data = {"version": VERSION, **asdict(self)}
        data["netns"] = list(self.netns)
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def parse(cls, text: str) -> OwnerRecord:
        """The record of a file's text; ValueError if it is not one."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ValueError("not a version 1 sandbox record")
        try:
            return cls(prefix=str(data["prefix"]), tag=str(data["tag"]),
                       pid=int(data["pid"]), start_time=int(data["start_time"]),
                       state_dir=str(data["state_dir"]),
                       netns=tuple(str(n) for n in data.get("netns", ())),
                       instance=(str(data["instance"]) if data.get("instance") else None),
                       kept=bool(data.get("kept", False)),
                       pidns=(int(data["pidns"]) if data.get("pidns") is not None else None))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"incomplete sandbox record: {exc}") from None


def parse_stat_start_time(text: str) -> int:
    """Field 22 of a ``/proc/PID/stat`` line (``starttime``, clock ticks after boot).
    The command name (field 2) may hold spaces and parentheses: fields are counted after
    its last ``)``."""
    rest = text[text.rindex(")") + 2:].split()
    return int(rest[19])              # field 3 is rest[0]


def proc_start_time(pid: int, proc: str = "/proc") -> int | None:
    """The start time of process ``pid``, or None when there is none."""
    try:
        with open(f"{proc}/{pid}/stat") as f:
            return parse_stat_start_time(f.read())
    except (OSError, ValueError, IndexError):
        return None


def own_pidns() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def owner_state(record: OwnerRecord, start_time_of: Callable[[int], int | None],
                pidns: int | None) -> str:
    """``"alive"``, ``"gone"`` (no such pid, or a pid started at another time: reused)
    or ``"unknown"`` (the owner lived in another pid namespace: this one cannot tell)."""
    if record.pidns is not None and pidns is not None and record.pidns != pidns:
        return "unknown"
    started = start_time_of(record.pid)
    if started is None or started != record.start_time:
        return "gone"
    return "alive"


# --- the files ---------------------------------------------------------------------------

def records_dir() -> str:
    return os.environ.get(RECORDS_ENV) or RECORDS_DIR


def record_path(record: OwnerRecord, directory: str | None = None) -> str:
    return os.path.join(directory or records_dir(), record.filename)


def write_record(record: OwnerRecord, directory: str | None = None) -> str:
    """Write (or replace, atomically) the record's file; its path."""
    directory = directory or records_dir()
    os.makedirs(directory, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".rec.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(record.to_json())
        os.chmod(tmp, 0o644)
        path = record_path(record, directory)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def remove_record(record: OwnerRecord, directory: str | None = None) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(record_path(record, directory))


def read_records(directory: str | None = None) -> Iterator[tuple[str, OwnerRecord | None]]:
    """``(path, record)`` for each record file; None for a file that is not a record."""
    directory = directory or records_dir()
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                yield path, OwnerRecord.parse(f.read())
        except FileNotFoundError:
            continue                   # removed meanwhile by its owner
        except (OSError, ValueError):
            yield path, None


@contextlib.contextmanager
def records_lock(directory: str | None = None) -> Iterator[None]:
    """An exclusive lock of the records directory: one remover at a time."""
    directory = directory or records_dir()
    os.makedirs(directory, mode=0o755, exist_ok=True)
    fd = os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
