"""The one module that runs ``nft``.

``Nft.apply`` pipes a whole script to ``nft -f -`` in the target namespace: all of it
applies or none does.  The exec seam (:class:`NftRunner`) lets unit tests check the
scripts; :class:`FakeNft` records them and ``dump()`` returns what was applied.
"""

from __future__ import annotations

import errno
from typing import Protocol

from hns import process
from hns.errors import KernelError

__all__ = ["FakeNft", "Nft", "NftRunner"]


class NftRunner(Protocol):
    def apply(self, script: str) -> None: ...

    def list_tables(self) -> list[str]: ...

    def list_table(self, family: str, name: str) -> str | None: ...


def _classify(stderr: str) -> int:
    text = stderr.lower()
    if "no such file or directory" in text:
        return errno.ENOENT
    if "file exists" in text:
        return errno.EEXIST
    if "operation not permitted" in text:
        return errno.EPERM
    return errno.EINVAL


class Nft:
    """nft in one network namespace (None: this process's)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def _run(self, args: list[str], script: str | None = None) -> str:
        result = process.run(["nft", *args], input=script, netns=self.netns)
        if result.returncode != 0:
            first = next((ln for ln in result.stderr.splitlines() if ln.strip()), "")
            raise KernelError(f"nft {' '.join(args)} failed: {first.strip() or result.returncode}",
                              _classify(result.stderr))
        return result.stdout

    def apply(self, script: str) -> None:
        self._run(["-f", "-"], script)

    def check(self, script: str) -> None:
        self._run(["--check", "-f", "-"], script)

    def list_tables(self) -> list[str]:
        """``family name`` of every table in the namespace."""
        out = self._run(["list", "tables"])
        return [line.removeprefix("table ").strip() for line in out.splitlines()
                if line.startswith("table ")]

    def list_table(self, family: str, name: str) -> str | None:
        try:
            return self._run(["list", "table", family, name])
        except KernelError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise


class FakeNft:
    """Records applied scripts instead of running nft."""

    def __init__(self) -> None:
        self.scripts: list[str] = []

    def apply(self, script: str) -> None:
        self.scripts.append(script)

    def list_tables(self) -> list[str]:
        return []

    def list_table(self, family: str, name: str) -> str | None:
        return None

    def dump(self) -> str:
        return "".join(self.scripts)
