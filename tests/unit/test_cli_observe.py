"""hnsctl's diag and capture words: where the filter may go, what is refused."""

from __future__ import annotations

import pytest

from hns import cli


def parsed(*argv: str) -> object:
    return cli.parse(cli._build_parser(), list(argv))


@pytest.mark.parametrize("argv", [
    ("capture", "vm0", "icmp", "-w", "f.pcap", "--count", "3"),
    ("capture", "vm0", "-w", "f.pcap", "--count", "3", "icmp"),
    ("capture", "-w", "f.pcap", "vm0", "--count", "3", "icmp"),
])
def test_the_filter_goes_before_or_after_the_options(argv: tuple[str, ...]) -> None:
    args = parsed(*argv)
    assert (args.what, args.write, args.count, args.filter) == (   # type: ignore[attr-defined]
        "vm0", "f.pcap", "3", ["icmp"])


def test_a_filter_in_two_places_keeps_its_order() -> None:
    args = parsed("capture", "vm0", "udp", "--count", "1", "port", "53")
    assert args.filter == ["udp", "port", "53"]                    # type: ignore[attr-defined]


def test_unknown_options_are_still_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (("capture", "vm0", "--bogus"), ("diag", "vm0", "extra"),
                 ("status", "x")):
        with pytest.raises(SystemExit) as exit_:
            parsed(*argv)
        assert exit_.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err


def test_diag_target() -> None:
    args = parsed("diag", "vm0", "--target", "198.51.100.1:80")
    assert (args.vm, args.target) == ("vm0", "198.51.100.1:80")    # type: ignore[attr-defined]
