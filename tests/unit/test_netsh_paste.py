"""``hnsctl netsh interface portproxy ...``: netsh command lines as pasted from Windows.

The words are named (netsh's positional order, ``localhost``) and then checked by the
same parse_add / parse_delete as ``hnsctl portproxy``; show prints netsh's layout.  No
kernel: the host's addresses (for the loop check) are stubbed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from hns import cli
from hns.cli import main
from hns.daemon import cli as daemon_cli
from hns.daemon.netsh import (
    NetshCommand,
    PortProxy,
    ProxyKey,
    parse_add,
    parse_delete,
    parse_netsh,
    render_show,
)
from hns.errors import InvalidRequest

PASTED = ("interface portproxy add v4tov4 listenport=8080 listenaddress=0.0.0.0 "
          "connectport=80 connectaddress=172.20.1.5")
WANTED = PortProxy("v4tov4", "tcp", IPv4Address("0.0.0.0"), 8080, IPv4Address("172.20.1.5"), 80)


def proxy_of(line: str) -> PortProxy:
    command = parse_netsh(line.split())
    assert command.verb in ("add", "set") and command.kind is not None
    return parse_add(command.kind, command.words)


def test_the_line_of_windows_docs() -> None:
    assert proxy_of(PASTED) == WANTED


@pytest.mark.parametrize("line", [
    "interface portproxy add v4tov4 8080 172.20.1.5 80 0.0.0.0",           # netsh's order
    "interface portproxy add v4tov4 8080 172.20.1.5 80 0.0.0.0 tcp",
    "int portproxy add v4tov4 8080 172.20.1.5 connectport=80",              # then keys
    "int portproxy add v4tov4 8080 listenaddress=0.0.0.0 connectaddress=172.20.1.5 "
    "connectport=80",
    "INTERFACE PortProxy ADD V4toV4 ListenPort=8080 CONNECTADDRESS=172.20.1.5 connectPort=80",
    "Int portproxy set v4tov4 8080 172.20.1.5 80",
])
def test_positional_keyed_and_any_case_mean_the_same(line: str) -> None:
    assert proxy_of(line) == WANTED


def test_positional_order_is_netsh_s_not_listen_first() -> None:
    # listenport, connectaddress, connectport, listenaddress: the second value is the
    # connect address, so 0.0.0.0 there is refused as netsh's target
    with pytest.raises(InvalidRequest, match=r"connectaddress 0\.0\.0\.0: unspecified"):
        proxy_of("interface portproxy add v4tov4 8080 0.0.0.0 80 172.20.1.5")


def test_netsh_s_defaults_and_beyond_netsh_keys_pass_through() -> None:
    p = proxy_of("interface portproxy add v6tov4 8443 10.0.0.5 protocol=udp idletimeout=30 "
                 "maxconnections=10")
    assert p == PortProxy("v6tov4", "udp", IPv6Address("::"), 8443, IPv4Address("10.0.0.5"),
                          8443, 30, 10)


@pytest.mark.parametrize("line, listen, connect", [
    ("add v4tov4 80 localhost 8080", "0.0.0.0", "127.0.0.1"),
    ("add v4tov6 80 LocalHost 8080", "0.0.0.0", "::1"),
    ("add v6tov4 listenport=80 connectaddress=localhost connectport=8080", "::", "127.0.0.1"),
    ("add v6tov6 80 connectport=8080 connectaddress=localhost", "::", "::1"),
    ("add v4tov6 80 ::1 8080 localhost", "127.0.0.1", "::1"),
    ("add v6tov4 80 10.0.0.1 8080 listenaddress=localhost", "::1", "10.0.0.1"),
])
def test_localhost_is_the_loopback_of_its_side(line: str, listen: str, connect: str) -> None:
    p = proxy_of(f"interface portproxy {line}")
    assert (str(p.listen_address), str(p.connect_address)) == (listen, connect)


def test_delete_positional_order_is_netsh_s() -> None:
    line = "interface portproxy delete v4tov4 8080 localhost tcp"
    command = parse_netsh(line.split(" "))
    assert command == NetshCommand("delete", "v4tov4",
                                   ("listenport=8080", "listenaddress=127.0.0.1", "protocol=tcp"))
    assert command.kind is not None
    assert parse_delete(command.kind, command.words) == ("v4tov4", ProxyKey("tcp", "127.0.0.1",
                                                                            8080))


def test_show_and_reset() -> None:
    assert parse_netsh(["interface", "portproxy", "show", "all"]) == NetshCommand("show")
    assert parse_netsh(["int", "portproxy", "SHOW", "V4toV6"]).what == "V4toV6"
    assert parse_netsh(["int", "portproxy", "show"]) == NetshCommand("show", what="all")
    assert parse_netsh(["interface", "portproxy", "Reset"]) == NetshCommand("reset")


@pytest.mark.parametrize("line, message", [
    ("", "got nothing"),
    ("interface portproxy", "expected interface portproxy"),
    ("interface ipv4 show addresses", "only 'portproxy'"),
    ("i portproxy show all", "only 'interface portproxy'"),
    ("netsh interface portproxy show all", "netsh context 'netsh'"),
    ("interfaces portproxy show all", "netsh context"),
    ("interface portproxy dump", "unknown portproxy command 'dump'"),
    ("interface portproxy sh all", "unknown portproxy command"),
    ("interface portproxy add", "add needs a type"),
    ("interface portproxy add v4tov5 80", "unknown proxy type"),
    ("interface portproxy add v4tov4 listenport=80 172.20.1.5", "without a key"),
    ("interface portproxy add v4tov4 80 1.2.3.4 80 0.0.0.0 tcp extra", "too many values"),
    ("interface portproxy delete v4tov4 80 0.0.0.0 tcp 1.2.3.4", "too many values"),
    ("interface portproxy reset now", "reset takes no parameters"),
    ("interface portproxy show all v4tov4", "show takes one"),
    ("interface portproxy add v4tov4 listenport = 80", "without spaces"),
])
def test_bad_command_lines(line: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_netsh(line.split())


@pytest.mark.parametrize("line", [
    "interface portproxy add v4tov4 80 172.20.1.5 listenport=81",      # twice
    "interface portproxy add v4tov4 http 172.20.1.5",                  # no service names
    "interface portproxy add v4tov4 80 example.com",                   # no names but localhost
    "interface portproxy add v4tov4 80 localhost.localdomain",
    "interface portproxy add v4tov4 80 172.20.1.5 80 ::",              # wrong family
    "interface portproxy add v4tov4 80 172.20.1.5 80 0.0.0.0 sctp",
    "interface portproxy add v4tov4 80 172.20.1.5 color=blue",
    "interface portproxy add v4tov4 connectaddress=172.20.1.5",        # no listenport
    "interface portproxy delete v4tov4 80 connectport=81",
])
def test_named_words_are_checked_by_parse_add_and_parse_delete(line: str) -> None:
    command = parse_netsh(line.split())
    assert command.kind is not None
    parse = parse_delete if command.verb == "delete" else parse_add
    with pytest.raises(InvalidRequest):
        parse(command.kind, command.words)


def test_render_show_is_netsh_s_layout() -> None:
    assert render_show([WANTED]) == (
        "\n"
        "Listen on ipv4:             Connect to ipv4:\n"
        "\n"
        "Address         Port        Address         Port\n"
        "--------------- ----------  --------------- ----------\n"
        "0.0.0.0         8080        172.20.1.5      80\n")
    assert render_show([]) == ""


def test_render_show_has_a_section_per_kind_in_netsh_s_order() -> None:
    v6 = proxy_of("interface portproxy add v6tov4 53 10.0.0.1 protocol=udp")
    v4 = proxy_of("interface portproxy add v4tov6 8080 2001:db8::1234:5678:9abc 80 10.0.0.2")
    text = render_show([v6, v4, WANTED])
    assert [line for line in text.splitlines() if line.startswith("Listen")] == [
        "Listen on ipv4:             Connect to ipv4:",
        "Listen on ipv4:             Connect to ipv6:",
        "Listen on ipv6:             Connect to ipv4:"]
    assert "10.0.0.2        8080        2001:db8::1234:5678:9abc 80\n" in text
    assert "::              53/udp      10.0.0.1        53\n" in text


# -- through hnsctl (the store in tmp_path; no kernel) ----------------------------------


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("HNS_STATE_DIR", raising=False)
    monkeypatch.delenv("HNS_HOST_NETNS", raising=False)
    monkeypatch.setattr(daemon_cli, "_local_addresses", lambda svc: frozenset())
    path = tmp_path / "state"
    path.mkdir()
    return path


def hnsctl(state: Path, line: str) -> int:
    return main(["--state-dir", str(state), "netsh", *line.split()])


def test_add_show_delete_reset_through_hnsctl(state: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert hnsctl(state, PASTED) == 0
    assert hnsctl(state, "int portproxy add v6tov6 9000 localhost 90 protocol=udp") == 0
    capsys.readouterr()
    assert hnsctl(state, "interface portproxy show v4tov4") == 0
    assert capsys.readouterr().out == render_show([WANTED])
    assert hnsctl(state, "interface portproxy show all --json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert [p["Type"] for p in shown] == ["v4tov4", "v6tov6"]
    assert shown[1]["ConnectAddress"] == "::1" and shown[1]["Protocol"] == "udp"
    assert main(["--state-dir", str(state), "portproxy", "show", "all"]) == 0
    assert capsys.readouterr().out.startswith("TYPE")      # hnsctl's own table, unchanged
    assert hnsctl(state, "interface portproxy delete v4tov4 8080 0.0.0.0") == 0
    assert hnsctl(state, "interface portproxy delete v4tov4 8080") == 0
    assert "nothing to delete" in capsys.readouterr().err
    assert hnsctl(state, "interface portproxy reset") == 0
    assert hnsctl(state, "interface portproxy show all") == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("line", [
    "interface portproxy add v4tov4 8080 0.0.0.0 80 172.20.1.5",
    "interface portproxy show v5tov5",
    "interface portproxy add v4tov4 8080 localhost",     # 127.0.0.1:8080: itself, a loop
    "int portproxy add v4tov4 listenport=8080\nx",
    "",
])
def test_bad_input_exits_2_with_one_line(state: Path, line: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--state-dir", str(state), "netsh", *line.split(" ")] if line else
                ["--state-dir", str(state), "netsh"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hnsctl: error: ") and len(err.splitlines()) == 1, err


def test_python_m_hns_runs_hnsctl(state: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "hns", "--state-dir", str(state), "netsh",
                           "interface", "portproxy", "show", "all"],
                          capture_output=True, text=True, check=False, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    usage = subprocess.run([sys.executable, "-m", "hns", "--help"], capture_output=True,
                           text=True, check=False, timeout=60)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: hnsctl")


@pytest.mark.skipif(("netsh", "add") not in cli.MAKES_STATE,
                    reason="hns/cli.py's MAKES_STATE has no netsh add yet")
def test_netsh_add_and_set_make_the_state_directory(state: Path) -> None:
    fresh = state / "new"
    assert main(["--state-dir", str(fresh), "netsh", *PASTED.split()]) == 0
    assert main(["--state-dir", str(state / "other"), "netsh", "int", "portproxy", "set",
                 "v4tov4", "8080", "172.20.1.5"]) == 0
    assert main(["--state-dir", str(state / "none"), "netsh", "int", "portproxy",
                 "show"]) == 2                     # a read does not make one
