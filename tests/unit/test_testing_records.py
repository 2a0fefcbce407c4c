"""Sandbox owner records: their format, the names they may claim, the staleness decision
(fake pids and start times), and the files (in a temporary directory)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hns.testing import stale
from hns.testing.records import (
    OwnerRecord,
    check_prefix,
    owner_state,
    parse_stat_start_time,
    proc_start_time,
    read_records,
    remove_record,
    write_record,
)


def record(**kw: object) -> OwnerRecord:
    fields: dict[str, object] = dict(
        prefix="hnst-", tag="ab12cd", pid=4242, start_time=777,
        state_dir="/tmp/hns-sandbox-hnst-ab12cd-x1y2", netns=("hnst-ab12cd-host",
                                                              "hnst-ab12cd-out"),
        instance="6119", pidns=4026531836)
    fields.update(kw)
    return OwnerRecord(**fields)  # type: ignore[arg-type]


def test_a_record_survives_its_text() -> None:
    rec = record(kept=True)
    assert OwnerRecord.parse(rec.to_json()) == rec
    assert rec.filename == "hnst-ab12cd.json"
    assert rec.name_stem == "hnst-ab12cd-"


def test_a_record_without_an_instance_yet() -> None:
    rec = record(instance=None, pidns=None)
    again = OwnerRecord.parse(rec.to_json())
    assert again.instance is None and again.pidns is None


@pytest.mark.parametrize("text", [
    "", "{", "[]", '{"version": 2}',
    '{"version": 1, "prefix": "hnst-", "tag": "ab"}',                       # no pid
])
def test_what_is_not_a_record(text: str) -> None:
    with pytest.raises(ValueError):
        OwnerRecord.parse(text)


@pytest.mark.parametrize("change", [
    {"netns": ("hnst-ab12cd-host", "other-ns")},        # a name not the sandbox's
    {"netns": ("hnst-zz-host",)},
    {"state_dir": "/"},                                  # never a state dir to remove
    {"state_dir": "/var/lib/hns"},
    {"instance": "../x"},
    {"tag": "a/b"},
    {"prefix": "-x"},
    {"pid": 0},
])
def test_a_record_claims_only_names_of_its_own(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        record(**change)


@pytest.mark.parametrize("prefix", ["hnst-", "ci7.", "a", "x" * 24, "My_run-"])
def test_prefixes_accepted(prefix: str) -> None:
    assert check_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["", "-a", ".a", "a/b", "a b", "x" * 25, "é"])
def test_prefixes_refused_naming_the_rule(prefix: str) -> None:
    with pytest.raises(ValueError, match="letters, digits"):
        check_prefix(prefix)


def test_stat_start_time_after_a_command_name_with_spaces_and_parens() -> None:
    fields = ["S"] + [str(n) for n in range(4, 22)] + ["987654"] + ["0"] * 30
    line = "1234 (a (weird) name) " + " ".join(fields) + "\n"
    assert parse_stat_start_time(line) == 987654


def test_own_start_time_is_read_from_proc() -> None:
    here = proc_start_time(os.getpid())
    assert here is not None and here > 0
    assert proc_start_time(2**22 + 12345) is None       # above pid_max's ceiling


@pytest.mark.parametrize(("running", "pidns", "state"), [
    ({4242: 777}, 4026531836, "alive"),
    ({}, 4026531836, "gone"),                            # no such process
    ({4242: 778}, 4026531836, "gone"),                   # the pid was reused
    ({4242: 777}, 99, "unknown"),                        # another pid namespace's owner
    ({}, None, "gone"),                                  # this one's unknown: by pid
])
def test_owner_state(running: dict[int, int], pidns: int | None, state: str) -> None:
    assert owner_state(record(), running.get, pidns) == state


def test_files_written_read_and_removed(tmp_path: Path) -> None:
    rec = record()
    path = write_record(rec, str(tmp_path))
    (tmp_path / "junk.json").write_text("not json")
    (tmp_path / ".lock").write_text("")
    found = dict(read_records(str(tmp_path)))
    assert found == {path: rec, str(tmp_path / "junk.json"): None}
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    remove_record(rec, str(tmp_path))
    remove_record(rec, str(tmp_path))                    # twice: nothing to remove
    assert dict(read_records(str(tmp_path))) == {str(tmp_path / "junk.json"): None}


def test_stale_records_only_gone_owners_prefix_and_kept(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    mine = record(pid=os.getpid(), start_time=proc_start_time(os.getpid()) or 1,
                  pidns=None, tag="aaaaaa", netns=(), instance=None)
    dead = record(tag="bbbbbb", netns=(), start_time=1, pidns=None)
    kept = record(tag="cccccc", netns=(), kept=True, pidns=None)
    other = record(prefix="ci-", tag="dddddd", netns=(), pidns=None)
    for rec in (mine, dead, kept, other):
        write_record(rec, str(tmp_path))
    monkeypatch.setattr("hns.testing.stale.proc_start_time",
                        lambda pid: proc_start_time(pid) if pid == os.getpid() else None)
    names = {r.tag for _, r in stale.stale_records(str(tmp_path))}
    assert names == {"bbbbbb", "cccccc", "dddddd"}
    names = {r.tag for _, r in stale.stale_records(str(tmp_path), kept=False)}
    assert names == {"bbbbbb", "dddddd"}
    names = {r.tag for _, r in stale.stale_records(str(tmp_path), prefix="hnst-")}
    assert names == {"bbbbbb", "cccccc"}


def test_instance_read_from_the_store_of_a_record_without_one(tmp_path: Path) -> None:
    import sqlite3
    state = tmp_path / "hns-sandbox-hnst-ab12cd-q"
    state.mkdir()
    with sqlite3.connect(state / "hns.db") as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT INTO meta VALUES ('instance', '5b3b')")
    assert stale.instance_of(record(instance=None, state_dir=str(state))) == "5b3b"
    assert stale.instance_of(record(instance="6119", state_dir=str(state))) == "6119"
    missing = str(tmp_path / "hns-sandbox-gone")
    assert stale.instance_of(record(instance=None, state_dir=missing)) is None
