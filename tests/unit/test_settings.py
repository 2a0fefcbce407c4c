"""hns.settings: the settings file read as WSL reads .wslconfig, flags over it."""

from __future__ import annotations

import json
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from hns.errors import InvalidRequest
from hns.model import format_port_list
from hns.settings import (
    DEFAULT_PATH,
    ENV_VAR,
    HEADER,
    LIVE,
    NAMES,
    RESTART,
    Settings,
    Source,
    changes,
    defaults,
    load,
    loads,
)
from hns.settings import resolve_path as resolve

PATH = "/etc/hns/wslconfig"
hypothesis_profile = hyp_settings(deadline=None, database=None, max_examples=200)


def parse(text: str) -> Settings:
    return loads(text, PATH)


def fails(text: str, path: str = PATH) -> str:
    """The message of the InvalidRequest that ``text`` raises, checked to be one line."""
    with pytest.raises(InvalidRequest) as info:
        loads(text, path)
    message = str(info.value)
    assert "\n" not in message and message == " ".join(message.splitlines())
    assert info.value.exit_code == 2
    return message


# defaults and the file


def test_defaults() -> None:
    s = defaults()
    assert s == Settings()
    assert (s.networking_mode, s.localhost_forwarding, s.dns_proxy, s.firewall) == \
        ("nat", True, True, True)
    assert (s.ignored_ports, s.host_address_loopback, s.vm_idle_timeout_ms) == ((), False, 60000)
    assert (s.state_dir, s.subnet, s.max_connections, s.relay_idle_timeout, s.host_netns) == \
        (None, None, 4096, 0, None)
    assert all(s.source(name) == Source("default") for name in NAMES)
    assert set(s.sources) == set(NAMES)
    assert s.notes == ()


def test_missing_default_file_gives_defaults(tmp_path: Path) -> None:
    s = load(str(tmp_path / "wslconfig"), explicit=False)
    assert s == defaults() and s.notes == ()


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    path = str(tmp_path / "nope")
    with pytest.raises(InvalidRequest, match=r"no such settings file") as info:
        load(path, explicit=True)
    assert str(info.value).startswith(f"{path}: ")
    assert info.value.exit_code == 2


def test_unreadable_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match=r"cannot read the settings file"):
        load(str(tmp_path), explicit=False)     # a directory


def test_load_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "wslconfig"
    path.write_text("[wsl2]\r\nnetworkingMode=mirrored\r\n\r\n[hns]\r\nmaxConnections=7\r\n")
    s = load(str(path), explicit=True)
    assert (s.networking_mode, s.max_connections) == ("mirrored", 7)
    assert s.source("maxConnections") == Source("file", f"{path}:5")


def test_byte_order_marks_and_utf16(tmp_path: Path) -> None:
    path = tmp_path / "wslconfig"
    path.write_bytes(b"\xef\xbb\xbf[wsl2]\nfirewall=false\n")
    assert not load(str(path), explicit=True).firewall
    path.write_text("[wsl2]\nfirewall=false\n", encoding="utf-16")
    assert not load(str(path), explicit=True).firewall


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "wslconfig"
    path.write_bytes(b"[wsl2]\n\nmemory=4\xffGB\n")
    with pytest.raises(InvalidRequest, match=r":3: not utf-8 text$"):
        load(str(path), explicit=True)


def test_empty_file_and_comments_only() -> None:
    assert parse("") == defaults()
    assert parse("# hns\n; wsl\n\n   \n\t# indented\n[wsl2]\n# nothing\n").notes == ()


# each key


@pytest.mark.parametrize(("section", "line", "attr", "value"), [
    ("wsl2", "networkingMode = mirrored", "networking_mode", "mirrored"),
    ("wsl2", "networkingMode = nat", "networking_mode", "nat"),
    ("wsl2", "localhostForwarding = false", "localhost_forwarding", False),
    ("wsl2", "dnsProxy = false", "dns_proxy", False),
    ("wsl2", "firewall = false", "firewall", False),
    ("wsl2", "ignoredPorts = 8080, 22,3000", "ignored_ports", (22, 3000, 8080)),
    ("wsl2", "ignoredPorts = 8000-8002", "ignored_ports", (8000, 8001, 8002)),
    ("wsl2", "ignoredPorts =", "ignored_ports", ()),
    ("wsl2", "hostAddressLoopback = true", "host_address_loopback", True),
    ("wsl2", "vmIdleTimeout = 120000", "vm_idle_timeout_ms", 120000),
    ("wsl2", "vmIdleTimeout = 0", "vm_idle_timeout_ms", 0),
    ("wsl2", "vmIdleTimeout = -1", "vm_idle_timeout_ms", -1),
    ("wsl2", f"vmIdleTimeout = {2**31 - 1}", "vm_idle_timeout_ms", 2**31 - 1),
    ("hns", "stateDir = /srv/hns", "state_dir", "/srv/hns"),
    ("hns", "stateDir = state", "state_dir", "/etc/hns/state"),
    ("hns", "stateDir = ../../var/lib/x/", "state_dir", "/var/lib/x"),
    ("hns", "stateDir =", "state_dir", None),
    ("hns", "subnet = 172.28.16.0/20", "subnet", IPv4Network("172.28.16.0/20")),
    ("hns", "subnet =", "subnet", None),
    ("hns", "maxConnections = 1", "max_connections", 1),
    ("hns", "maxConnections = 1000000", "max_connections", 1_000_000),
    ("hns", "maxConnections = 007", "max_connections", 7),
    ("hns", "relayIdleTimeout = 300", "relay_idle_timeout", 300),
    ("hns", "relayIdleTimeout = 0", "relay_idle_timeout", 0),
    ("hns", "relayIdleTimeout = 31536000", "relay_idle_timeout", 31_536_000),
    ("hns", "hostNetns = host-a", "host_netns", "host-a"),
    ("hns", "hostNetns =", "host_netns", None),
])
def test_each_key(section: str, line: str, attr: str, value: object) -> None:
    s = parse(f"[{section}]\n{line}\n")
    assert getattr(s, attr) == value
    name = line.partition("=")[0].strip()
    assert s.source(name) == Source("file", f"{PATH}:2")
    assert s.value(name) == value


@pytest.mark.parametrize(("word", "value"), [
    ("true", True), ("false", False), ("TRUE", True), ("False", False), ("1", True),
    ("0", False), ("yes", True), ("no", False), ("On", True), ("off", False)])
def test_booleans(word: str, value: bool) -> None:
    assert parse(f"[wsl2]\nfirewall = {word}\n").firewall is value


def test_case_insensitive_sections_and_keys() -> None:
    s = parse("[WSL2]\nNETWORKINGMODE = MIRRORED\nHostAddressLoopBack = True\n"
              "[Experimental]\nignoredports = 22\n[HNS]\nmaxconnections = 9\n")
    assert (s.networking_mode, s.host_address_loopback, s.ignored_ports, s.max_connections) \
        == ("mirrored", True, (22,), 9)
    assert s.notes == ()


def test_values_are_trimmed_and_spacing_is_free() -> None:
    s = parse("  [ wsl2 ]  \n\tvmIdleTimeout=5\t\nfirewall   =   false   \n")
    assert (s.vm_idle_timeout_ms, s.firewall) == (5, False)


def test_trailing_comments() -> None:
    s = parse("[wsl2] # the VM\nvmIdleTimeout = 5 # ms\nfirewall = false ; off\n"
              "[hns]\nstateDir = /srv/a#b;c\nhostNetns = x  #\n")
    assert (s.vm_idle_timeout_ms, s.firewall) == (5, False)
    assert s.state_dir == "/srv/a#b;c"          # no blank before: part of the value
    assert s.host_netns == "x"


def test_quoted_values() -> None:
    s = parse('[hns]\nstateDir = "/srv/my state # 1" # comment\nhostNetns = "h"\n')
    assert (s.state_dir, s.host_netns) == ("/srv/my state # 1", "h")
    assert parse('[hns]\nsubnet = ""\n').subnet is None


def test_repeated_section_headers_merge() -> None:
    s = parse("[wsl2]\nfirewall=false\n[hns]\nmaxConnections=3\n[wsl2]\ndnsProxy=false\n")
    assert (s.firewall, s.dns_proxy, s.max_connections) == (False, False, 3)


def test_experimental_keys() -> None:
    s = parse("[experimental]\nnetworkingMode = mirrored\nignoredPorts = 80\n"
              "hostAddressLoopback = true\nfirewall = false\n")
    assert (s.networking_mode, s.ignored_ports, s.host_address_loopback, s.firewall) == \
        ("mirrored", (80,), True, False)
    assert s.source("ignoredPorts") == Source("file", f"{PATH}:3")
    assert s.notes == ()


@pytest.mark.parametrize("key", ["dnsTunneling", "autoProxy", "sparseVhd",
                                 "autoMemoryReclaim"])
def test_experimental_wsl_keys_are_noted(key: str) -> None:
    assert parse(f"[experimental]\n{key} = true\n").notes == (
        f"{PATH}:2: {key} is a WSL setting hns ignores",)


def test_a_key_in_the_wrong_section_is_noted() -> None:
    s = parse("[experimental]\nlocalhostForwarding = false\n[wsl2]\nsubnet = x\n")
    assert s.localhost_forwarding and s.subnet is None
    assert s.notes == (
        f"{PATH}:2: localhostForwarding is not read in [experimental] (ignored; it "
        "belongs in [wsl2])",
        f"{PATH}:4: subnet is not read in [wsl2] (ignored; it belongs in [hns])")


# notes: WSL's keys, unknown keys and sections


@pytest.mark.parametrize("line", [
    "memory = 8GB", "processors = 4", "kernel = C:\\\\temp\\\\kernel",
    "kernelCommandLine = vsyscall=emulate", "swap = 0", "swapFile = C:\\\\swap.vhdx",
    "pageReporting = false", "guiApplications = false", "debugConsole = true",
    "nestedVirtualization = false", "dnsTunneling = true", "autoProxy = false",
    "safeMode = true", "sparseVhd = true", "autoMemoryReclaim = gradual",
    "defaultVhdSize = 1TB", "kernelModules = C:\\\\m.vhdx", "vmSwitch = ext"])
def test_wsl_keys_are_ignored_with_a_note(line: str) -> None:
    s = parse(f"# x\n[wsl2]\n{line}\n")
    key = line.partition("=")[0].strip()
    assert s == defaults()
    assert s.notes == (f"{PATH}:3: {key} is a WSL setting hns ignores",)


def test_wsl_key_any_case_is_ignored() -> None:
    assert parse("[wsl2]\nMEMORY=1GB\n").notes == (f"{PATH}:2: MEMORY is a WSL setting hns "
                                                   "ignores",)


def test_unknown_key_is_noted() -> None:
    s = parse("[wsl2]\nfirewall = false\ncolour = blue\n[hns]\nturbo=1\n")
    assert not s.firewall
    assert s.notes == (f"{PATH}:3: unknown key 'colour' in [wsl2] (ignored)",
                       f"{PATH}:5: unknown key 'turbo' in [hns] (ignored)")


def test_unknown_section_is_noted_and_its_keys_skipped() -> None:
    s = parse("[boot]\nsystemd = true\nfirewall = not-a-bool\nmemory = 1\n[wsl2]\n"
              "firewall = false\n")
    assert not s.firewall
    assert s.notes == (f"{PATH}:1: unknown section [boot] (its keys are ignored)",)


def test_key_outside_any_section_is_noted() -> None:
    s = parse("firewall = false\n[wsl2]\n")
    assert s.firewall
    assert s.notes == (f"{PATH}:1: firewall is outside any section (ignored)",)


def test_settings_without_effect_in_the_mode_are_noted() -> None:
    nat = parse("[wsl2]\nignoredPorts = 22\nhostAddressLoopback = true\n")
    assert nat.notes == (
        f"{PATH}:2: ignoredPorts has an effect in mirrored mode only (networkingMode is nat)",
        f"{PATH}:3: hostAddressLoopback has an effect in mirrored mode only "
        "(networkingMode is nat)")
    mirrored = parse("[wsl2]\nnetworkingMode=mirrored\nlocalhostForwarding=false\n"
                     "[hns]\nsubnet=10.1.0.0/16\n")
    assert mirrored.notes == (
        f"{PATH}:5: subnet has an effect in nat mode only (networkingMode is mirrored)",
        f"{PATH}:3: localhostForwarding has an effect in nat mode only "
        "(networkingMode is mirrored)")
    same_as_default = parse("[wsl2]\nignoredPorts =\nhostAddressLoopback = false\n")
    assert same_as_default.notes == ()
    flagged = loads("", PATH, flags={"ignoredPorts": "80"})
    assert flagged.notes == ("ignoredPorts has an effect in mirrored mode only "
                             "(networkingMode is nat)",)


# errors


@pytest.mark.parametrize(("line", "expected"), [
    ("[wsl2]\nnetworkingMode = bridged", "networkingMode: WSL's bridged mode is not supported"),
    ("[wsl2]\nnetworkingMode = None", "networkingMode: WSL's none mode is not supported"),
    ("[wsl2]\nnetworkingMode = virtioproxy", "networkingMode: WSL's virtioproxy mode"),
    ("[wsl2]\nnetworkingMode = overlay", "networkingMode: expected nat or mirrored"),
    ("[wsl2]\nnetworkingMode =", "networkingMode: expected nat or mirrored, not ''"),
    ("[wsl2]\nlocalhostForwarding = maybe", "localhostForwarding: expected true or false"),
    ("[wsl2]\ndnsProxy =", "dnsProxy: expected true or false, not ''"),
    ("[wsl2]\nfirewall = \uff54\uff52\uff55\uff45", "firewall: expected true or false"),
    ("[wsl2]\nhostAddressLoopback = 2", "hostAddressLoopback: expected true or false"),
    ("[wsl2]\nignoredPorts = 0", "ignoredPorts: invalid port list 0"),
    ("[wsl2]\nignoredPorts = 65536", "ignoredPorts: invalid port list 65536"),
    ("[wsl2]\nignoredPorts = 22,,80", "ignoredPorts: invalid port list '22,,80': empty"),
    ("[wsl2]\nignoredPorts = http", "ignoredPorts: invalid port list 'http': not a number"),
    ("[wsl2]\nignoredPorts = 90-80", "ignoredPorts: invalid port list '90-80': range"),
    ("[wsl2]\nignoredPorts = 1-5000", "ignoredPorts: invalid port list '1-5000': more than"),
    ("[wsl2]\nvmIdleTimeout = -2", "vmIdleTimeout: expected milliseconds from 0 to"),
    ("[wsl2]\nvmIdleTimeout = 1e3", "vmIdleTimeout: expected milliseconds"),
    ("[wsl2]\nvmIdleTimeout = 60s", "vmIdleTimeout: expected milliseconds"),
    ("[wsl2]\nvmIdleTimeout = +5", "vmIdleTimeout: expected milliseconds"),
    ("[wsl2]\nvmIdleTimeout = ٣", "vmIdleTimeout: expected milliseconds"),
    ("[wsl2]\nvmIdleTimeout = 2147483648", "vmIdleTimeout: expected milliseconds"),
    ("[wsl2]\nvmIdleTimeout = " + "9" * 5000, "vmIdleTimeout: expected milliseconds"),
    ("[hns]\nmaxConnections = 0", "maxConnections: expected a number from 1 to 1000000"),
    ("[hns]\nmaxConnections = 1000001", "maxConnections: expected a number from 1"),
    ("[hns]\nmaxConnections = -1", "maxConnections: expected a number from 1"),
    ("[hns]\nrelayIdleTimeout = -1", "relayIdleTimeout: expected seconds from 0"),
    ("[hns]\nrelayIdleTimeout = 1.5", "relayIdleTimeout: expected seconds from 0"),
    ("[hns]\nrelayIdleTimeout = 31536001", "relayIdleTimeout: expected seconds from 0 to 3153"),
    ("[hns]\nsubnet = 172.28.16.1/20", "subnet: invalid subnet '172.28.16.1/20'"),
    ("[hns]\nsubnet = 8.8.8.0/24", "subnet: invalid subnet '8.8.8.0/24': use a private"),
    ("[hns]\nsubnet = fd00::/64", "subnet: invalid subnet 'fd00::/64': NAT networks are IPv4"),
    ("[hns]\nsubnet = 10.0.0.0/31", "subnet: invalid subnet '10.0.0.0/31': too small"),
    ("[hns]\nsubnet = lan", "subnet: invalid subnet 'lan'"),
    ("[hns]\nhostNetns = a/b", "hostNetns: invalid namespace name 'a/b'"),
    ("[hns]\nhostNetns = ..", "hostNetns: invalid namespace name '..'"),
    ("[hns]\nstateDir = /a\0b", "stateDir: invalid path '/a\\x00b': contains NUL"),
    ('[hns]\nstateDir = "/srv/x', "stateDir: the quote is not closed"),
    ('[hns]\nstateDir = "/srv/x" y', "stateDir: text after the closing quote: 'y'"),
])
def test_bad_values(line: str, expected: str) -> None:
    message = fails(f"# settings\n{line}\n")
    assert message.startswith(f"{PATH}:3: {expected}")


@pytest.mark.parametrize("line", [
    "just words", "[wsl2", "[]", "[ ]", "[wsl2] extra", "[a[b]", "[wsl 2]", "= 1",
    "two words = 1", "port:22", "-"])
def test_lines_that_are_no_entry(line: str) -> None:
    message = fails(f"[wsl2]\n{line}\n")
    assert message.startswith(f"{PATH}:2: expected ")


def test_a_long_bad_line_is_clipped() -> None:
    message = fails("x" * 500)
    assert len(message) < 150 and message.endswith("...'")


@pytest.mark.parametrize("text", [
    "[wsl2]\nfirewall = true\nfirewall = false\n",
    "[wsl2]\nfirewall = true\n[hns]\n[wsl2]\nFIREWALL = true\n",
    "[experimental]\nignoredPorts = 1\n[wsl2]\nignoredPorts = 2\n",
    "[wsl2]\nmemory = 1GB\nMemory = 2GB\n",
])
def test_duplicate_keys(text: str) -> None:
    lines = text.rstrip("\n").split("\n")
    message = fails(text)
    assert message.startswith(f"{PATH}:{len(lines)}: ")
    assert "is set twice (first on line" in message


def test_the_same_wsl_key_in_both_wsl_sections_is_no_duplicate() -> None:
    notes = parse("[experimental]\nautoProxy = true\n[wsl2]\nautoProxy = true\n").notes
    assert len(notes) == 2


def test_error_messages_carry_the_path_given() -> None:
    assert fails("[hns]\nmaxConnections = x", "cfg/wsl.ini").startswith("cfg/wsl.ini:2: ")


# flags


def test_flags_override_the_file() -> None:
    s = loads("[wsl2]\nnetworkingMode = mirrored\nfirewall = false\n", PATH,
              flags={"networkingMode": "nat", "maxConnections": 12})
    assert (s.networking_mode, s.max_connections, s.firewall) == ("nat", 12, False)
    assert s.source("networkingMode") == Source("flag")
    assert s.source("maxConnections") == Source("flag")
    assert s.source("firewall") == Source("file", f"{PATH}:3")
    assert str(s.source("networkingMode")) == "flag"


def test_flags_take_typed_values_and_text() -> None:
    s = loads("", PATH, flags={
        "localhostForwarding": False, "dnsProxy": "off", "ignoredPorts": [80, 22, 80],
        "vmIdleTimeout": -1, "subnet": IPv4Network("10.9.0.0/16"), "hostNetns": "h",
        "stateDir": "rel/dir", "relayIdleTimeout": "30", "networkingMode": "Mirrored"})
    assert (s.localhost_forwarding, s.dns_proxy, s.ignored_ports, s.vm_idle_timeout_ms) == \
        (False, False, (22, 80), -1)
    assert (s.subnet, s.host_netns, s.state_dir, s.relay_idle_timeout, s.networking_mode) == \
        (IPv4Network("10.9.0.0/16"), "h", "rel/dir", 30, "mirrored")


def test_flags_given_as_none_are_not_given() -> None:
    s = loads("[hns]\nmaxConnections = 5\n", PATH, flags={"maxConnections": None})
    assert s.max_connections == 5
    assert s.source("maxConnections").kind == "file"


def test_flag_names_compare_without_case() -> None:
    assert loads("", PATH, flags={"MAXCONNECTIONS": 3}).source("maxConnections").kind == "flag"


@pytest.mark.parametrize(("flags", "expected"), [
    ({"networkingMode": "bridged"}, "networkingMode: WSL's bridged mode is not supported"),
    ({"firewall": 1}, "firewall: expected true or false, not 1"),
    ({"maxConnections": True}, "maxConnections: expected a number"),
    ({"maxConnections": 0}, "maxConnections: expected a number from 1 to 1000000, not 0"),
    ({"vmIdleTimeout": -5}, "vmIdleTimeout: expected milliseconds"),
    ({"ignoredPorts": [0]}, "ignoredPorts: invalid port 0"),
    ({"ignoredPorts": ["x"]}, "ignoredPorts: invalid port 'x'"),
    ({"ignoredPorts": [True]}, "ignoredPorts: invalid port True"),
    ({"ignoredPorts": 22}, "ignoredPorts: expected comma separated ports"),
    ({"ignoredPorts": list(range(1, 5000))}, "ignoredPorts: more than 4096 ports"),
    ({"subnet": 5}, "subnet: expected text, not 5"),
    ({"subnet": IPv4Network("8.8.8.0/24")}, "subnet: invalid subnet '8.8.8.0/24'"),
    ({"hostNetns": "a\nb"}, "hostNetns: invalid namespace name 'a\\nb'"),
    ({"memory": "4GB"}, "memory: not a setting of hns (choose from: networkingMode, "),
    ({"turbo": 1}, "turbo: not a setting of hns"),
])
def test_bad_flags(flags: dict[str, object], expected: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        loads("[wsl2]\nfirewall = true\n", PATH, flags=flags)
    message = str(info.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_bad_flag_is_reported_even_when_the_file_sets_the_key() -> None:
    with pytest.raises(InvalidRequest, match=r"^networkingMode: expected nat or mirrored"):
        loads("[wsl2]\nnetworkingMode = mirrored\n", PATH, flags={"networkingMode": "x"})


def test_load_takes_flags(tmp_path: Path) -> None:
    s = load(str(tmp_path / "missing"), explicit=False, flags={"firewall": False})
    assert not s.firewall and s.source("firewall").kind == "flag"


# where the file is


def test_resolve_path() -> None:
    assert resolve(None, {}) == (DEFAULT_PATH, False)
    assert resolve(None, {ENV_VAR: ""}) == (DEFAULT_PATH, False)
    assert resolve(None, {ENV_VAR: "/x"}) == ("/x", True)
    assert resolve("/y", {ENV_VAR: "/x"}) == ("/y", True)
    with pytest.raises(InvalidRequest, match=r"^--config: expected a path"):
        resolve("", {})


# live reload


@pytest.mark.parametrize(("flags", "live", "restart"), [
    ({"localhostForwarding": False}, ["localhostForwarding"], []),
    ({"ignoredPorts": "22"}, ["ignoredPorts"], []),
    ({"hostAddressLoopback": True}, ["hostAddressLoopback"], []),
    ({"vmIdleTimeout": -1}, ["vmIdleTimeout"], []),
    ({"maxConnections": 1}, ["maxConnections"], []),
    ({"relayIdleTimeout": 9}, ["relayIdleTimeout"], []),
    ({"networkingMode": "mirrored"}, [], ["networkingMode"]),
    ({"dnsProxy": False}, [], ["dnsProxy"]),
    ({"firewall": False}, [], ["firewall"]),
    ({"stateDir": "/srv"}, [], ["stateDir"]),
    ({"subnet": "10.0.0.0/8"}, [], ["subnet"]),
    ({"hostNetns": "h"}, [], ["hostNetns"]),
    ({"hostNetns": "h", "maxConnections": 2, "firewall": False},
     ["maxConnections"], ["firewall", "hostNetns"]),
])
def test_changes(flags: dict[str, object], live: list[str], restart: list[str]) -> None:
    old, new = defaults(), loads("", PATH, flags=flags)
    assert changes(old, new) == (live, restart)
    assert changes(new, old) == (live, restart)


def test_changes_ignore_where_a_value_came_from() -> None:
    old = parse("[hns]\nmaxConnections = 4096\n")
    assert old == defaults()
    assert changes(old, defaults()) == ([], [])


def test_live_and_restart_split_every_setting() -> None:
    assert set(NAMES) == LIVE | RESTART and not LIVE & RESTART
    restart = {"networkingMode", "dnsProxy", "firewall", "stateDir", "subnet", "hostNetns",
               "metrics", "cluster", "hostName"}
    assert restart == RESTART


# output


def test_to_json_shape() -> None:
    s = loads("[wsl2]\n\nignoredPorts = 80,22\n[hns]\nsubnet = 10.5.0.0/16\n", PATH,
              flags={"hostNetns": "h"})
    out = s.to_json()
    assert list(out) == list(NAMES)
    assert all(set(entry) == {"Value", "Source", "Where"} for entry in out.values())
    assert out["ignoredPorts"] == {"Value": [22, 80], "Source": "file", "Where": f"{PATH}:3"}
    assert out["subnet"] == {"Value": "10.5.0.0/16", "Source": "file", "Where": f"{PATH}:5"}
    assert out["hostNetns"] == {"Value": "h", "Source": "flag", "Where": None}
    assert out["stateDir"] == {"Value": None, "Source": "default", "Where": None}
    assert out["vmIdleTimeout"] == {"Value": 60000, "Source": "default", "Where": None}
    assert json.loads(json.dumps(out)) == out


def test_rows() -> None:
    s = loads("[wsl2]\nignoredPorts = 80,81,82,22\n", PATH, flags={"firewall": "false"})
    rows = s.rows()
    assert HEADER == ("KEY", "VALUE", "SOURCE")
    assert [row[0] for row in rows] == list(NAMES)
    table = {key: (value, source) for key, value, source in rows}
    assert table["ignoredPorts"] == ("22,80-82", f"{PATH}:2")
    assert table["firewall"] == ("false", "flag")
    assert table["localhostForwarding"] == ("true", "default")
    assert table["subnet"] == ("-", "default")
    assert table["vmIdleTimeout"] == ("60000", "default")


def test_settings_are_frozen_and_hashable() -> None:
    s = defaults()
    with pytest.raises(AttributeError):
        s.firewall = False  # type: ignore[misc]
    assert hash(s) == hash(parse("[wsl2]\nfirewall = true\n"))


# properties


@hypothesis_profile
@given(st.lists(st.integers(1, 65535), max_size=50), st.sampled_from(["", " ", "  ", "\t"]))
def test_any_valid_ignored_ports_list_round_trips(ports: list[int], blank: str) -> None:
    """Any order, repeats and blanks: the sorted distinct ports, which print and read
    back the same."""
    text = f"[wsl2]\nignoredPorts = {(blank + ',' + blank).join(map(str, ports))}\n"
    parsed = parse(text).ignored_ports
    assert parsed == tuple(sorted(set(ports)))
    assert parse(f"[wsl2]\nignoredPorts = {format_port_list(parsed)}\n").ignored_ports == parsed
    assert loads("", PATH, flags={"ignoredPorts": ports}).ignored_ports == parsed


@hypothesis_profile
@given(st.text(max_size=80))
def test_any_line_is_an_entry_a_note_or_a_one_line_error(line: str) -> None:
    for text in (f"[wsl2]\n{line}\n", f"[hns]\n{line}\n", line):
        try:
            s = parse(text)
        except InvalidRequest as exc:
            message = str(exc)
            assert message.startswith(f"{PATH}:")
            assert len(message.splitlines()) == 1
        else:
            assert all(len(note.splitlines()) == 1 for note in s.notes)


@pytest.mark.parametrize(("name", "value"), [
    ("networkingMode", "mirrored"), ("localhostForwarding", False), ("dnsProxy", False),
    ("firewall", True), ("ignoredPorts", [22, 8000, 8001, 8002]), ("ignoredPorts", []),
    ("hostAddressLoopback", True), ("vmIdleTimeout", -1), ("vmIdleTimeout", 0),
    ("stateDir", "/srv/hns state"), ("stateDir", None), ("subnet", "10.7.0.0/16"),
    ("subnet", None), ("maxConnections", 1_000_000), ("relayIdleTimeout", 5),
    ("hostNetns", "host@1"), ("hostNetns", None)])
def test_rows_values_read_back(name: str, value: object) -> None:
    """What rows() prints for a setting reads back from the file as the same value."""
    s = loads("", PATH, flags={name: value})
    text = {key: text for key, text, _ in s.rows()}[name]
    section = "hns" if name in {"stateDir", "subnet", "maxConnections", "relayIdleTimeout",
                                "hostNetns"} else "wsl2"
    again = parse(f"[{section}]\n{name} = {'' if text == '-' else text}\n")
    assert again == s
