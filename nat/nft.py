"""The one module that runs ``nft``.

``Nft.run`` renders a :class:`~nat.transaction.Transaction` once and pipes it to ``nft
-f -`` in the target namespace: all of it applies or none does (``Nft.apply`` pipes a
script given as text).  Two seams: the program runner (``run=``, :class:`Runner`: argv,
stdin and a namespace; the default enters the namespace with ``nsenter``) and the
exception raised (``error=``, :data:`nat.errors.ErrorFactory`; default
:class:`~nat.errors.NatError`), so that a caller keeps its own process runner and error
hierarchy.  :class:`~nat.fake.FakeNft` (re-exported here) stands in for unit tests: it
applies transactions to an in-memory ruleset.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Sequence
from typing import Protocol

from nat.errors import ErrorFactory, NatError
from nat.fake import FakeNft
from nat.transaction import Transaction

__all__ = ["FakeNft", "Nft", "NftRunner", "Runner", "parse_set_counters", "run"]

NETNS_DIR = "/run/netns"


class NftRunner(Protocol):
    """What hns needs of nft: apply a transaction, list tables (:class:`Nft`,
    :class:`~nat.fake.FakeNft`)."""

    def run(self, tx: Transaction) -> None: ...

    def list_tables(self) -> list[str]: ...

    def list_table(self, family: str, name: str) -> str | None: ...


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], *, input: str | None = None,
                 netns: str | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess[str]: ...


def run(argv: Sequence[str], *, input: str | None = None, netns: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion in namespace ``netns`` (a name under /run/netns; None:
    this process's), capturing output; never raises for a non-zero exit."""
    full = list(argv) if not netns else [
        "nsenter", f"--net={os.path.join(NETNS_DIR, netns)}", "--", *argv]
    try:
        return subprocess.run(full, input=input, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except FileNotFoundError as exc:
        return subprocess.CompletedProcess(list(argv), 127, "", f"{exc.filename}: not found")


def _classify(stderr: str) -> int:
    text = stderr.lower()
    if "no such file or directory" in text:
        return errno.ENOENT
    if "file exists" in text:
        return errno.EEXIST
    if "operation not permitted" in text:
        return errno.EPERM
    if "device or resource busy" in text:
        return errno.EBUSY
    if "operation not supported" in text:
        return errno.EOPNOTSUPP
    return errno.EINVAL


class Nft:
    """nft in one network namespace (None: this process's)."""

    def __init__(self, netns: str | None = None, *, run: Runner = run,
                 error: ErrorFactory = NatError) -> None:
        self.netns = netns
        self._exec = run
        self._error = error

    def _result(self, args: list[str], script: str | None = None
                ) -> subprocess.CompletedProcess[str]:
        return self._exec(["nft", *args], input=script, netns=self.netns)

    def _failure(self, args: list[str], result: subprocess.CompletedProcess[str]) -> Exception:
        first = next((ln for ln in result.stderr.splitlines() if ln.strip()), "")
        return self._error(f"nft {' '.join(args)} failed: {first.strip() or result.returncode}",
                           _classify(result.stderr))

    def _run(self, args: list[str], script: str | None = None) -> str:
        result = self._result(args, script)
        if result.returncode != 0:
            raise self._failure(args, result)
        return result.stdout

    def run(self, tx: Transaction) -> None:
        """Apply the transaction, rendered once to ``nft -f -`` (nothing to do: nft is
        not run)."""
        if tx:
            self._run(["-f", "-"], tx.render())

    def check(self, script: str) -> None:
        self._run(["--check", "-f", "-"], script)

    def list_tables(self) -> list[str]:
        """``family name`` of every table in the namespace."""
        out = self._run(["list", "tables"])
        return [line.removeprefix("table ").strip() for line in out.splitlines()
                if line.startswith("table ")]

    def set_counters(self, family: str, table: str, name: str
                     ) -> dict[tuple[str, ...], tuple[int, int]] | None:
        """The counters of a set's elements (key -> packets, bytes); None if there is no
        such set or table."""
        args = ["-j", "list", "set", family, table, name]
        result = self._result(args)
        if result.returncode == 0:
            return parse_set_counters(result.stdout)
        if _classify(result.stderr) == errno.ENOENT:
            return None
        raise self._failure(args, result)

    def list_table(self, family: str, name: str) -> str | None:
        """The table's text, None if there is no such table."""
        args = ["list", "table", family, name]
        result = self._result(args)
        if result.returncode == 0:
            return result.stdout
        if _classify(result.stderr) == errno.ENOENT:
            return None
        raise self._failure(args, result)


def parse_set_counters(listing: str) -> dict[tuple[str, ...], tuple[int, int]]:
    """Element key -> (packets, bytes) of ``nft -j list set`` output (pure): keys as nft
    writes them, each atom a string (``("172.16.0.2", "tcp", "80")``)."""
    counters: dict[tuple[str, ...], tuple[int, int]] = {}
    for item in json.loads(listing).get("nftables", []):
        for elem in item.get("set", {}).get("elem", []):
            body = elem.get("elem") if isinstance(elem, dict) else None
            if not isinstance(body, dict) or not isinstance(body.get("counter"), dict):
                continue
            value = body.get("val")
            atoms = value.get("concat", []) if isinstance(value, dict) else [value]
            counter = body["counter"]
            counters[tuple(str(a) for a in atoms)] = (int(counter.get("packets", 0)),
                                                    int(counter.get("bytes", 0)))
    return counters
