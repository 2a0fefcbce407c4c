"""The texts the plugin puts in reports, the capture file names, and wait_until."""

from __future__ import annotations

import itertools

import pytest

from hns.testing import wait_until
from hns.testing.pcap import pcap_name
from hns.testing.report import (
    CaptureFile,
    KeptSandbox,
    Part,
    capture_text,
    diagnostics_text,
    error_line,
    kept_text,
)


def test_diagnostics_text_titles_each_part() -> None:
    text = diagnostics_text("hnst-ab-host", [Part("vm vm0: hns.diag", "STEP RESULT\nok\n"),
                                             Part("nft", "")])
    assert text.splitlines() == ["sandbox hnst-ab-host", "-------- vm vm0: hns.diag",
                                 "STEP RESULT", "ok", "-------- nft", "(empty)"]


def test_error_line_is_one_line() -> None:
    assert error_line("hns.diag", ImportError("no module\nmore")) == \
        "hns.diag: ImportError: no module"
    assert error_line("x", RuntimeError()) == "x: RuntimeError"


def test_kept_text_says_how_to_enter_read_and_remove() -> None:
    kept = KeptSandbox("hnst-ab-host", "hnst-ab-out", "/tmp/hns-sandbox-hnst-ab-1",
                       ("hns-6119-vm0",), python="/usr/bin/python3")
    lines = kept_text(kept).splitlines()
    assert "  enter the host:    ip netns exec hnst-ab-host bash" in lines
    assert "  enter the outside: ip netns exec hnst-ab-out bash" in lines
    assert "  enter a VM:        ip netns exec hns-6119-vm0 bash" in lines
    assert "  state dir: /tmp/hns-sandbox-hnst-ab-1" in lines
    assert ("  its state:         hnsctl --state-dir /tmp/hns-sandbox-hnst-ab-1 "
            "--host-netns hnst-ab-host status") in lines
    assert any("/usr/bin/python3 -m hns.cli --state-dir" in line for line in lines)
    assert any("hnsctl gc --sandboxes" in line for line in lines)


def test_capture_text_kept_deleted_and_failed() -> None:
    files = [CaptureFile("vm0", "/t/a.pcap", 7), CaptureFile("vm1", "/t/b.pcap",
                                                            error="hns.capture: Boom")]
    kept = capture_text(files, kept=True).splitlines()
    assert kept == ["vm vm0: /t/a.pcap (7 packets)   read it: tcpdump -nr /t/a.pcap",
                    "vm vm1: no capture (hns.capture: Boom)"]
    assert capture_text(files, kept=False).splitlines()[0] == "vm vm0: deleted"
    assert capture_text([], kept=True) == ""


@pytest.mark.parametrize(("nodeid", "name"), [
    ("tests/test_a.py::test_x", "test_x-ab12-vm0.pcap"),
    ("t.py::Test::test_y[a/b c]", "Test_test_y_a_b_c-ab12-vm0.pcap"),
    ("t.py::" + "z" * 200, "z" * 80 + "-ab12-vm0.pcap"),
])
def test_pcap_names_have_no_separators(nodeid: str, name: str) -> None:
    assert pcap_name(nodeid, "ab12", "vm0") == name


def test_wait_until_returns_the_first_true_value() -> None:
    counter = itertools.count()
    assert wait_until(lambda: next(counter) >= 3 and "ready", interval=0.001) == "ready"


def test_wait_until_names_what_it_waited_for() -> None:
    with pytest.raises(TimeoutError, match=r"after 0.05 s waiting for the moon"):
        wait_until(lambda: False, timeout=0.05, interval=0.01, what="the moon")


def test_wait_until_lets_the_predicate_raise() -> None:
    def boom() -> bool:
        raise KeyError("x")
    with pytest.raises(KeyError):
        wait_until(boom)
