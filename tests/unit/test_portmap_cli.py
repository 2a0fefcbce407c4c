"""hnsctl portmap: bad input exits 2 with one line and changes nothing; list and the
deletes of nothing need no kernel.  The state lives in tmp_path; nft is never run."""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from pathlib import Path
from typing import NoReturn

import pytest
from helpers.portmap import seed

from hns import process
from hns.cli import main
from hns.model import PortMapping, Protocol
from hns.store import Store


def _kernel_touched(*args: object, **kwargs: object) -> NoReturn:
    raise AssertionError(f"the kernel was touched: {args} {kwargs}")


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Networks n, VMs a and b, and a mapping tcp *:8080 -> a:80 and udp 198.51.100.2:53."""
    monkeypatch.delenv("HNS_STATE_DIR", raising=False)
    monkeypatch.delenv("HNS_HOST_NETNS", raising=False)
    monkeypatch.setattr(process, "run", _kernel_touched)
    path = tmp_path / "state"
    seed(path)
    store = Store(path)
    with store.write() as tx:
        tx.insert_port_mappings({"a": store.vm("a").id}, [
            PortMapping("a", Protocol.TCP, 8080, 80),
            PortMapping("a", Protocol.UDP, 53, 5353, IPv4Address("198.51.100.2"))])
    store.close()
    return path


def rows(state: Path) -> list[PortMapping]:
    store = Store(state)
    try:
        return [m.mapping for m in store.port_mappings()]
    finally:
        store.close()


def hnsctl(state: Path, *args: str) -> int:
    return main(["--state-dir", str(state), *args])


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hnsctl: error:")
    return lines[0]


ADD = ("portmap", "add")


@pytest.mark.parametrize(("args", "words"), [
    ((*ADD, "a", "--protocol", "tcp", "--external-port", "8080", "--internal-port", "81"),
     "host port tcp *:8080 is already mapped: tcp *:8080 -> vm a port 80"),
    ((*ADD, "b", "--protocol", "tcp", "--external-port", "8080", "--internal-port", "80",
      "--host-address", "198.51.100.2"), "already mapped"),
    ((*ADD, "b", "--protocol", "udp", "--external-port", "53", "--internal-port", "53"),
     "host port udp *:53 is already mapped: udp 198.51.100.2:53"),
    ((*ADD, "b", "--protocol", "udp", "--external-port", "53", "--internal-port", "53",
      "--host-address", "198.51.100.2"), "already mapped"),
    ((*ADD, "b", "--protocol", "sctp", "--external-port", "1", "--internal-port", "1"),
     "invalid protocol 'sctp'"),
    ((*ADD, "b", "--protocol", "tcp", "--external-port", "0", "--internal-port", "1"),
     "invalid external port 0"),
    ((*ADD, "b", "--protocol", "tcp", "--external-port", "65536", "--internal-port", "1"),
     "between 1 and 65535"),
    ((*ADD, "b", "--protocol", "tcp", "--external-port", "http", "--internal-port", "1"),
     "invalid external port 'http': not a number"),
    ((*ADD, "b", "--protocol", "tcp", "--external-port", "1", "--internal-port", "-5"),
     "invalid internal port"),
    ((*ADD, "nope", "--protocol", "tcp", "--external-port", "1", "--internal-port", "1"),
     "vm 'nope' does not exist"),
    ((*ADD, "bad name!", "--protocol", "tcp", "--external-port", "1", "--internal-port", "1"),
     "invalid vm name"),
    ((*ADD, "b", "--protocol", "tcp", "--external-port", "1", "--internal-port", "1",
      "--host-address", "example.com"), "invalid host address 'example.com'"),
    ((*ADD, "b", "--protocol", "tcp", "--external-port", "1", "--internal-port", "1",
      "--host-address", "2001:db8::2"), "IPv4 only"),
    ((*ADD, "b", "--protocol", "tcp", "--external-port", "1", "--internal-port", "1",
      "--host-address", "127.0.0.1"), "loopback"),
    (("portmap", "delete", "b", "--protocol", "tcp", "--external-port", "8080"),
     "mapped to vm 'a', not 'b'"),
    (("portmap", "delete", "a", "--protocol", "icmp", "--external-port", "8080"),
     "invalid protocol"),
    (("portmap", "delete", "a", "--protocol", "tcp", "--external-port", "x"),
     "not a number"),
    (("portmap", "list", "nope"), "vm 'nope' does not exist"),
])
def test_bad_input_returns_2_and_changes_nothing(state: Path, args: tuple[str, ...], words: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    before = rows(state)
    assert hnsctl(state, *args) == 2
    assert words in one_error_line(capsys)
    assert rows(state) == before


@pytest.mark.parametrize("args", [
    ("portmap",),
    ("portmap", "add", "a", "--protocol", "tcp", "--external-port", "1"),
    ("portmap", "add", "a", "--external-port", "1", "--internal-port", "1"),
    ("portmap", "delete", "a", "--protocol", "tcp"),
    ("portmap", "delete", "a", "--protocol", "tcp", "--external-port", "1",
     "--internal-port", "1"),
])
def test_missing_options_exit_2(state: Path, args: tuple[str, ...],
                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        hnsctl(state, *args)
    assert excinfo.value.code == 2
    one_error_line(capsys)


def test_list_text_and_json(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert hnsctl(state, "portmap", "list") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["VM", "PROTOCOL", "HOST", "ADDRESS", "EXTERNAL", "PORT",
                              "INTERNAL", "PORT"]
    assert [line.split() for line in out[1:]] == [["a", "tcp", "*", "8080", "80"],
                                                  ["a", "udp", "198.51.100.2", "53", "5353"]]
    assert hnsctl(state, "portmap", "list", "b", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []
    assert hnsctl(state, "--json", "portmap", "list", "a") == 0
    assert json.loads(capsys.readouterr().out) == [
        {"Vm": "a", "Protocol": "tcp", "ExternalPort": 8080, "InternalPort": 80,
         "HostAddress": None},
        {"Vm": "a", "Protocol": "udp", "ExternalPort": 53, "InternalPort": 5353,
         "HostAddress": "198.51.100.2"}]


def test_vm_show_has_the_policies(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert hnsctl(state, "--json", "vm", "show", "a") == 0
    assert json.loads(capsys.readouterr().out)["Policies"] == [
        {"Type": "PortMapping", "Settings": {"Protocol": 6, "InternalPort": 80,
                                             "ExternalPort": 8080, "VIP": ""}},
        {"Type": "PortMapping", "Settings": {"Protocol": 17, "InternalPort": 5353,
                                             "ExternalPort": 53, "VIP": "198.51.100.2"}}]


@pytest.mark.parametrize(("args", "line"), [
    (("a", "--protocol", "tcp", "--external-port", "9999"),
     "hnsctl: vm 'a' has no port mapping tcp *:9999 (nothing to delete)"),
    (("a", "--protocol", "tcp", "--external-port", "8080", "--host-address", "198.51.100.2"),
     "hnsctl: vm 'a' has no port mapping tcp 198.51.100.2:8080 (nothing to delete)"),
    (("nope", "--protocol", "udp", "--external-port", "1"),
     "hnsctl: vm 'nope' has no port mapping udp *:1 (nothing to delete)"),
])
def test_deleting_nothing_is_fine(state: Path, args: tuple[str, ...], line: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    before = rows(state)
    assert hnsctl(state, "portmap", "delete", *args) == 0
    out, err = capsys.readouterr()
    assert (out, err.splitlines()) == ("", [line])
    assert rows(state) == before
