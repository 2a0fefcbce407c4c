"""Removing sandboxes whose owner is gone, by the names in their owner records.

A test run that was SIGKILLed (or lost its machine's power mid-way, or was kept with
``--hns-keep-on-failure``) leaves its sandbox: namespaces, the VM namespaces of its hns
instance, ``/etc/netns`` entries, a state directory, maybe a daemon serving it.  Its
owner record (:mod:`hns.testing.records`) names all of them.  For a record whose owner
is gone (no such pid, or a pid reused by a process started at another time), in order:

1. the daemon holding the state directory's lock (``hnsctl daemon`` of that sandbox:
   it would heal what is being removed) gets SIGTERM, then SIGKILL;
2. every process inside the VM namespaces of the instance (``hns-<instance>-*``) and
   inside the sandbox's own namespaces is killed, and the namespaces are deleted with
   their ``/etc/netns`` entries;
3. the state directory and the record are removed.

A record whose owner lives, or lived in another pid namespace, is never touched; nothing
is removed that the record does not name.  Removers take the records directory's lock,
so two sessions starting at once do not trip over each other.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import time

from hns.testing.records import (
    OwnerRecord,
    own_pidns,
    owner_state,
    proc_start_time,
    read_records,
    records_dir,
    records_lock,
)

__all__ = ["instance_of", "remove_record_objects", "remove_stale_sandboxes", "stale_records"]

DAEMON_STOP_TIMEOUT = 10.0


def stale_records(directory: str | None = None, *, prefix: str | None = None,
                  kept: bool = True) -> list[tuple[str, OwnerRecord]]:
    """The records (path, record) whose owner is gone; with ``prefix``, only sandboxes
    whose names start with it; ``kept=False`` leaves out sandboxes kept on purpose."""
    pidns = own_pidns()
    found = []
    for path, record in read_records(directory):
        if record is None:
            continue
        if prefix is not None and not record.name_stem.startswith(prefix):
            continue
        if record.kept and not kept:
            continue
        if owner_state(record, proc_start_time, pidns) == "gone":
            found.append((path, record))
    return found


def remove_stale_sandboxes(dry_run: bool = False, *, prefix: str | None = None,
                           kept: bool = True, directory: str | None = None) -> list[str]:
    """Remove every sandbox whose owning process is gone; what was removed (or, with
    ``dry_run``, would be), one string per object: ``"netns hnst-ab12cd-host"``,
    ``"/etc/netns/..."``, ``"state dir ..."``, ``"daemon pid N"``.

    ``prefix``: only sandboxes whose names start with it.  ``kept=False``: not the ones
    kept by ``--hns-keep-on-failure`` (what a new pytest session does at its start)."""
    if os.geteuid() != 0:
        return []
    if not os.path.isdir(directory or records_dir()):
        return []
    removed: list[str] = []
    with records_lock(directory):
        for path, record in stale_records(directory, prefix=prefix, kept=kept):
            removed += remove_record_objects(record, dry_run)
            if not dry_run:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
    return removed


def instance_of(record: OwnerRecord) -> str | None:
    """The hns instance tag of the sandbox: from the record, else from its store (a
    sandbox killed between making its store and updating its record)."""
    if record.instance:
        return record.instance
    db = os.path.join(record.state_dir, "hns.db")
    if not os.path.exists(db):
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True,
                                                timeout=2)) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()
    except sqlite3.Error:
        return None
    return str(row[0]) if row else None


def remove_record_objects(record: OwnerRecord, dry_run: bool = False) -> list[str]:
    """Remove what ``record`` names (see the module's docstring); what was removed."""
    from hns.naming import netns_prefix
    from hns.netns import list_netns
    from hns.resolv import ETC_NETNS
    removed = _stop_daemon(record.state_dir, dry_run)
    instance = instance_of(record)
    existing = list_netns()
    names = [ns for ns in existing if instance and ns.startswith(netns_prefix(instance))]
    names += [ns for ns in record.netns if ns in existing]
    etc = [ns for ns in _etc_entries(ETC_NETNS)
           if ns in record.netns or (instance and ns.startswith(netns_prefix(instance)))]
    for ns in names:
        removed.append(f"netns {ns}")
        if not dry_run:
            _delete_netns(ns)
    for ns in etc:
        removed.append(f"{ETC_NETNS}/{ns}")
        if not dry_run:
            shutil.rmtree(os.path.join(ETC_NETNS, ns), ignore_errors=True)
    if os.path.isdir(record.state_dir):
        removed.append(f"state dir {record.state_dir}")
        if not dry_run:
            shutil.rmtree(record.state_dir, ignore_errors=True)
    return removed


def _etc_entries(etc_netns: str) -> list[str]:
    try:
        return sorted(os.listdir(etc_netns))
    except FileNotFoundError:
        return []


def _delete_netns(name: str) -> None:
    from hns.kernel import kill_netns_processes
    from hns.netns import delete_netns
    kill_netns_processes(name)
    delete_netns(name)


def _stop_daemon(state_dir: str, dry_run: bool) -> list[str]:
    """Stop the daemon that holds the lock of ``state_dir``, if one does."""
    from hns.daemon.daemon import DaemonLock
    if not os.path.isdir(state_dir):
        return []
    lock = DaemonLock(state_dir)
    pid = lock.holder()
    if not pid:
        return []
    if dry_run:
        return [f"daemon pid {pid}"]
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + DAEMON_STOP_TIMEOUT
    while lock.holder() == pid and time.monotonic() < deadline:
        time.sleep(0.05)
    if lock.holder() == pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return [f"daemon pid {pid}"]
