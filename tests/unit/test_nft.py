"""nat.nft: what is run (argv, stdin, namespace) and how nft's failures are classified.

A recorder stands in for the program runner (``run=``): nothing is executed.
"""

from __future__ import annotations

import errno
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hns import process
from hns.errors import KernelError
from hns.nft import nft
from nat.errors import NatError
from nat.nft import FakeNft, Nft, NftRunner
from nat.ruleset import Table
from nat.transaction import Transaction

ROOT = Path(__file__).resolve().parents[2]
TX = Transaction().destroy_table("inet", "hns-ab12")
SCRIPT = TX.render()


@dataclass
class Call:
    argv: list[str]
    input: str | None
    netns: str | None


@dataclass
class FakeRun:
    """Stands in for the runner: records calls, answers with a fixed result."""

    returncode: int = 0
    stdout: str = ""
    stderr: str = ""
    calls: list[Call] = field(default_factory=list)

    def __call__(self, argv: Sequence[str], *, input: str | None = None,
                 netns: str | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess[str]:
        self.calls.append(Call(list(argv), input, netns))
        return subprocess.CompletedProcess(list(argv), self.returncode, self.stdout,
                                           self.stderr)


@pytest.fixture
def fake_run() -> FakeRun:
    return FakeRun()


# what runs


def test_apply_pipes_the_script_to_nft_f_dash(fake_run: FakeRun) -> None:
    Nft(run=fake_run).run(TX)
    assert fake_run.calls == [Call(["nft", "-f", "-"], SCRIPT, None)]


def test_apply_in_a_named_namespace(fake_run: FakeRun) -> None:
    Nft("hostns", run=fake_run).run(TX)
    assert fake_run.calls == [Call(["nft", "-f", "-"], SCRIPT, "hostns")]


def test_run_renders_the_transaction_once(fake_run: FakeRun) -> None:
    tx = Transaction().destroy_table("inet", "hns-ab12").add_table(Table("inet", "hns-ab12"))
    Nft("hostns", run=fake_run).run(tx)
    assert fake_run.calls == [Call(["nft", "-f", "-"], tx.render(), "hostns")]
    assert tx.render() == ("add table inet hns-ab12\ndelete table inet hns-ab12\n"
                           "add table inet hns-ab12\n")


def test_run_of_an_empty_transaction_runs_nothing(fake_run: FakeRun) -> None:
    Nft(run=fake_run).run(Transaction())
    assert fake_run.calls == []


def test_check_uses_nft_check(fake_run: FakeRun) -> None:
    Nft(run=fake_run).check(SCRIPT)
    assert fake_run.calls == [Call(["nft", "--check", "-f", "-"], SCRIPT, None)]


def test_list_tables_parses_the_output(fake_run: FakeRun) -> None:
    fake_run.stdout = "table inet hns-ab12\ntable ip filter\n\n"
    assert Nft(run=fake_run).list_tables() == ["inet hns-ab12", "ip filter"]
    assert fake_run.calls == [Call(["nft", "list", "tables"], None, None)]


def test_list_tables_empty(fake_run: FakeRun) -> None:
    assert Nft(run=fake_run).list_tables() == []


def test_list_table_returns_the_text(fake_run: FakeRun) -> None:
    fake_run.stdout = "table inet hns-ab12 {\n}\n"
    assert Nft("h", run=fake_run).list_table("inet", "hns-ab12") == "table inet hns-ab12 {\n}\n"
    assert fake_run.calls == [Call(["nft", "list", "table", "inet", "hns-ab12"], None, "h")]


# errors


def test_no_such_file_is_enoent(fake_run: FakeRun) -> None:
    fake_run.returncode = 1
    fake_run.stderr = "Error: No such file or directory"
    with pytest.raises(NatError) as excinfo:
        Nft(run=fake_run).run(TX)
    assert excinfo.value.errno == errno.ENOENT
    assert excinfo.value.is_not_found
    assert not excinfo.value.is_exists
    assert fake_run.calls == [Call(["nft", "-f", "-"], SCRIPT, None)]


@pytest.mark.parametrize(("stderr", "code"), [
    ("Error: No such file or directory\ndelete table inet x\n^^^^^^", errno.ENOENT),
    ("Error: Could not process rule: File exists", errno.EEXIST),
    ("Error: Could not process rule: Operation not permitted", errno.EPERM),
    ("Error: Could not process rule: Device or resource busy", errno.EBUSY),
    ("Error: Could not process rule: Operation not supported", errno.EOPNOTSUPP),
    ("Error: syntax error, unexpected junk", errno.EINVAL),
    ("nft: not found", errno.EINVAL),
    ("", errno.EINVAL),
])
def test_errors_are_classified(fake_run: FakeRun, stderr: str, code: int) -> None:
    fake_run.returncode = 1
    fake_run.stderr = stderr
    with pytest.raises(NatError) as excinfo:
        Nft(run=fake_run).run(TX)
    assert excinfo.value.errno == code


def test_error_message_is_the_first_non_blank_stderr_line(fake_run: FakeRun) -> None:
    fake_run.returncode = 1
    fake_run.stderr = "\n  Error: File exists  \n/dev/stdin:1:1-2: more detail\n"
    with pytest.raises(NatError) as excinfo:
        Nft(run=fake_run).run(TX)
    assert str(excinfo.value) == "nft -f - failed: Error: File exists"
    assert excinfo.value.is_exists


def test_error_message_without_stderr_gives_the_exit_code(fake_run: FakeRun) -> None:
    fake_run.returncode = 127
    with pytest.raises(NatError, match="failed: 127"):
        Nft(run=fake_run).list_tables()


def test_list_table_missing_is_none(fake_run: FakeRun) -> None:
    fake_run.returncode = 1
    fake_run.stderr = "Error: No such file or directory\nlist table inet nope\n"
    assert Nft(run=fake_run).list_table("inet", "nope") is None


def test_list_table_other_errors_raise(fake_run: FakeRun) -> None:
    fake_run.returncode = 1
    fake_run.stderr = "Error: Operation not permitted"
    with pytest.raises(NatError) as excinfo:
        Nft(run=fake_run).list_table("inet", "x")
    assert excinfo.value.errno == errno.EPERM


def test_hns_gets_its_own_runner_and_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRun(returncode=1, stderr="Error: File exists")
    monkeypatch.setattr(process, "run", fake)
    with pytest.raises(KernelError) as excinfo:
        nft("hostns").run(TX)
    assert excinfo.value.is_exists
    assert fake.calls == [Call(["nft", "-f", "-"], SCRIPT, "hostns")]


# the fake


def test_fake_nft_is_a_runner() -> None:
    fake = FakeNft()
    runner: NftRunner = fake
    runner.run(Transaction().add_table(Table("inet", "t", comment="hns:x")))
    assert runner.list_tables() == ["inet t"]
    assert 'comment "hns:x"' in (runner.list_table("inet", "t") or "")
    assert runner.list_table("inet", "nope") is None


def test_an_empty_transaction_runs_nothing(fake_run: FakeRun) -> None:
    Nft(run=fake_run).run(Transaction())
    assert fake_run.calls == []


def test_fake_nft_destroys_a_table_whether_or_not_it_is_there() -> None:
    fake = FakeNft()
    fake.run(Transaction().destroy_table("inet", "t"))        # idempotent: nothing there
    fake.run(Transaction().add_table(Table("inet", "t")))
    fake.run(Transaction().destroy_table("inet", "t"))
    assert fake.list_tables() == []


def test_fake_nft_starts_empty() -> None:
    assert FakeNft().dump() == "" and FakeNft().list_tables() == []


# the package


@pytest.mark.parametrize("module", ["nat", "nat.ruleset", "nat.nft", "hns", "hns.cli",
                                    "hns.ipam", "hns.store", "hns.service"])
def test_modules_import_on_their_own(module: str) -> None:
    """A fresh interpreter (pytest's hns plugin has long loaded hns here): no import cycle."""
    result = subprocess.run([sys.executable, "-c", f"import {module}"],
                            capture_output=True, text=True, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stderr
