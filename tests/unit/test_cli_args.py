"""hnsctl argument and input errors: exit 2, one line on stderr, nothing changed.

Everything here stops before the kernel: argparse errors, validation, and the store's
own answers (not found, already exists, VMs attached).  The state lives in tmp_path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, NoReturn

import pytest

from hns import cli, kernel, naming, netns, process, service
from hns.cli import main
from hns.model import Network, NetworkType, Vm
from hns.store import Store

PREFIX = "hnsctl: error:"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HNS_STATE_DIR", raising=False)
    monkeypatch.delenv("HNS_HOST_NETNS", raising=False)


def _kernel_touched(*args: object, **kwargs: object) -> NoReturn:
    raise AssertionError(f"the kernel was touched: {args} {kwargs}")


KERNEL_ENTRY_POINTS = ("HostKernel", "create_netns", "delete_netns", "list_netns",
                      "configure_vm_side", "kill_netns_processes", "run_in_netns")


@pytest.fixture(autouse=True)
def _no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the service reaches netlink, a namespace or a subprocess."""
    for module in (kernel, netns, service):
        for name in KERNEL_ENTRY_POINTS:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, _kernel_touched)
    monkeypatch.setattr(process, "run", _kernel_touched)
    monkeypatch.setattr(cli, "exec_in_netns", _kernel_touched)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """An empty state directory (read commands refuse one that does not exist)."""
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def seeded(state: Path) -> Iterator[tuple[Network, Vm]]:
    """A network ``n`` (10.50.0.0/24) with a VM ``v`` (10.50.0.2), in the store only."""
    store = Store(state)
    net_id, vm_id = str(uuid.uuid4()), str(uuid.uuid4())
    net = Network(id=net_id, name="n", type=NetworkType.NAT,
                  subnet=IPv4Network("10.50.0.0/24"), gateway=IPv4Address("10.50.0.1"),
                  mtu=1500, bridge=naming.bridge_name(store.instance, net_id))
    vm = Vm(id=vm_id, name="v", network="n", network_id=net_id,
            netns=naming.vm_netns_name(store.instance, "v"), ip=IPv4Address("10.50.0.2"),
            prefixlen=24, gateway=net.gateway, mac="00:15:5d:00:00:01",
            host_ifname=naming.host_veth_name(store.instance, vm_id), mtu=1500)
    with store.write() as tx:
        tx.insert_network(net)
        tx.insert_vm(vm)
    store.close()
    yield net, vm


def hnsctl(state: Path, *args: str) -> int:
    return main(["--state-dir", str(state), *args])


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n")
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX)
    return lines[0]


def snapshot(state: Path) -> tuple[list[Network], list[Vm]]:
    store = Store(state)
    try:
        return store.networks(), store.vms()
    finally:
        store.close()


# argparse errors: SystemExit(2)


@pytest.mark.parametrize("argv", [
    [],
    ["bogus"],
    ["network"],
    ["network", "bogus"],
    ["network", "create", "n"],                       # missing --type
    ["network", "create", "--type", "nat"],           # missing name
    ["network", "create", "n", "--type"],
    ["network", "create", "n", "--type", "nat", "--bogus"],
    ["network", "delete"],
    ["vm"],
    ["vm", "create", "v"],                            # missing --network
    ["vm", "show"],
    ["network", "list", "extra"],
    ["gc", "--dry-run", "--now"],
])
def test_parse_errors_exit_2_with_one_line(argv: list[str], state: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        hnsctl(state, *argv)
    assert excinfo.value.code == 2
    assert "--help" in one_error_line(capsys)
    assert list(state.iterdir()) == []  # nothing was opened


def test_global_option_without_value_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["--state-dir"])
    assert excinfo.value.code == 2
    assert "--state-dir" in one_error_line(capsys)


def test_missing_type_names_the_option(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        hnsctl(tmp_path, "network", "create", "n")
    assert "--type" in one_error_line(capsys)


def test_unknown_command_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        hnsctl(tmp_path, "bogus")
    assert "'bogus'" in one_error_line(capsys)


# validation errors: return 2, before any kernel access


@pytest.mark.parametrize(("args", "words"), [
    (["network", "create", "bad name!", "--type", "nat"], "invalid network name"),
    (["network", "create", "x" * 33, "--type", "nat"], "invalid network name"),
    (["network", "create", "_x", "--type", "nat"], "invalid network name"),
    (["network", "create", "a\nb", "--type", "nat"], "invalid network name 'a\\nb'"),
    (["network", "create", "n2", "--type", "bridge"], "unknown network type"),
    (["network", "create", "n2", "--type", "nat", "--subnet", "10.60.0.0/33"], "subnet"),
    (["network", "create", "n2", "--type", "nat", "--subnet", "10.60.0.1/24"], "host bits"),
    (["network", "create", "n2", "--type", "nat", "--subnet", "8.8.8.0/24"], "private"),
    (["network", "create", "n2", "--type", "nat", "--subnet", "fd00::/64"], "IPv4 only"),
    (["network", "create", "n2", "--type", "nat", "--subnet", "10.60.0.0/24",
      "--gateway", "10.61.0.1"], "outside the subnet"),
    (["network", "create", "n2", "--type", "nat", "--subnet", "10.60.0.0/24",
      "--gateway", "10.60.0.255"], "broadcast"),
    (["network", "create", "n2", "--type", "nat", "--gateway", "10.60.0.1"],
     "--gateway needs --subnet"),
    (["network", "create", "n2", "--type", "nat", "--gateway", "bogus"], "invalid gateway"),
    (["network", "create", "n2", "--type", "nat", "--mtu", "99"], "invalid MTU"),
    (["network", "create", "n2", "--type", "nat", "--mtu", "big"], "invalid MTU"),
    (["network", "show", "nope"], "does not exist"),
    (["vm", "create", "bad name!", "--network", "n"], "invalid vm name"),
    (["vm", "create", "v2", "--network", "nope"], "network 'nope' does not exist"),
    (["vm", "create", "v2", "--network", "n", "--ip", "bogus"], "not an IP address"),
    (["vm", "create", "v2", "--network", "n", "--mac", "01:00:5e:00:00:01"], "multicast"),
    (["vm", "create", "v2", "--network", "n", "--mac", "zz"], "invalid MAC"),
    (["vm", "show", "nope"], "does not exist"),
    (["vm", "list", "--network", "nope"], "does not exist"),
    (["vm", "exec", "v"], "needs a command"),
    (["vm", "exec", "v", "--"], "needs a command"),
    (["vm", "exec", "nope", "--", "true"], "vm 'nope' does not exist"),
])
def test_invalid_input_returns_2_with_one_line(state: Path, args: list[str], words: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert hnsctl(state, *args) == 2
    assert words in one_error_line(capsys)
    assert snapshot(state) == ([], [])


def test_bad_network_name_from_the_brief(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--state-dir", str(tmp_path), "network", "create", "bad name!", "--type", "nat"])
    assert rc == 2
    assert one_error_line(capsys).startswith("hnsctl: error: invalid network name 'bad name!'")


@pytest.mark.parametrize(("args", "words"), [
    (["network", "create", "n", "--type", "nat"], "already exists"),
    (["network", "delete", "n"], "VMs attached (v)"),
    (["vm", "create", "v", "--network", "n"], "already exists"),
    (["vm", "create", "v2", "--network", "n", "--ip", "10.50.0.2"], "already in use"),
    (["vm", "create", "v2", "--network", "n", "--ip", "10.51.0.2"], "outside the subnet"),
    (["vm", "create", "v2", "--network", "n", "--ip", "10.50.0.1"], "reserved"),
    (["vm", "create", "v2", "--network", "n", "--mac", "00-15-5D-00-00-01"],
     "already in use"),
])
def test_refusals_from_the_state_return_2(state: Path, seeded: tuple[Network, Vm],
                                          args: list[str], words: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(state)
    assert hnsctl(state, *args) == 2
    assert words in one_error_line(capsys)
    assert snapshot(state) == before


def test_missing_host_netns_returns_2(state: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert hnsctl(state, "--host-netns", f"hns-unit-{uuid.uuid4().hex}", "network",
                  "list") == 2
    assert "host namespace" in one_error_line(capsys)


@pytest.mark.parametrize("name", ["../../tmp", "..", "."])
def test_host_netns_must_be_a_name(state: Path, name: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert hnsctl(state, "--host-netns", name, "network", "list") == 2
    assert "host namespace" in one_error_line(capsys)


# commands that need no kernel


def test_list_on_an_empty_state(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert hnsctl(state, "network", "list") == 0
    out, err = capsys.readouterr()
    assert out.split() == ["NAME", "TYPE", "SUBNET", "GATEWAY", "MTU", "BRIDGE"]
    assert err == ""


@pytest.mark.parametrize("args", [["--json", "network", "list"], ["network", "list", "--json"],
                                  ["--json", "vm", "list"], ["vm", "list", "--json"]])
def test_json_list_on_an_empty_state(state: Path, args: list[str],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert hnsctl(state, *args) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_show_and_list_json_from_the_state(state: Path, seeded: tuple[Network, Vm],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    net, vm = seeded
    assert hnsctl(state, "--json", "network", "show", "n") == 0
    assert json.loads(capsys.readouterr().out) == net.to_json()
    assert hnsctl(state, "vm", "list", "--network", "n", "--json") == 0
    # the CLI looks at the real kernel, where the seeded VM has no namespace
    assert json.loads(capsys.readouterr().out) == [{**vm.to_json(), "State": "Missing"}]


@pytest.mark.parametrize(("args", "line"), [
    (["network", "delete", "nope"],
     "hnsctl: network 'nope' does not exist (nothing to delete)"),
    (["vm", "delete", "nope"], "hnsctl: vm 'nope' does not exist (nothing to delete)"),
    (["down"], "hnsctl: nothing to remove"),
])
def test_deleting_nothing_is_fine(state: Path, args: list[str], line: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert hnsctl(state, *args) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [line]


# the state directory, the host namespace, numbers, names on delete (exit 2, nothing made)


READ_OR_REMOVE = [
    ["network", "list"], ["network", "show", "n"], ["network", "delete", "n"],
    ["vm", "list"], ["vm", "show", "v"], ["vm", "delete", "v"], ["vm", "exec", "v", "--", "true"],
    ["portmap", "list"], ["portmap", "delete", "v", "--protocol", "tcp", "--external-port", "80"],
    ["portproxy", "show"], ["portproxy", "delete", "v4tov4", "listenport=80"],
    ["portproxy", "reset"], ["status"], ["gc"], ["gc", "--dry-run"], ["down"],
]


@pytest.mark.parametrize("args", READ_OR_REMOVE)
def test_a_missing_state_dir_is_not_created_by_reads_and_removals(
        tmp_path: Path, args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nothing-here"
    assert hnsctl(missing, *args) == 2
    assert "does not exist" in one_error_line(capsys)
    assert not missing.exists()


def test_a_create_command_makes_the_state_dir(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "a" / "b"
    assert hnsctl(state, "vm", "create", "v", "--network", "nope") == 2
    assert "network 'nope' does not exist" in one_error_line(capsys)
    assert (state / "hns.db").exists()


@pytest.mark.parametrize(("make", "words"), [
    (lambda p: "", "invalid --state-dir '': empty"),
    (lambda p: (p / "file").write_text("x") and str(p / "file"), "not a directory"),
    (lambda p: (p / "file").write_text("x") and str(p / "file" / "sub"),
     "file is not a directory"),
    (lambda p: (p / "link").symlink_to(p / "gone") or str(p / "link"), "not a directory"),
    (lambda p: str(p / ("x" * 256)), "name too long"),
    (lambda p: "/" + "d/" * 2100, "name too long"),
])
@pytest.mark.parametrize("args", [["network", "list"], ["network", "create", "n", "--type",
                                                        "nat"]])
def test_a_bad_state_dir_is_exit_2(tmp_path: Path, make: Any, words: str, args: list[str],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(tmp_path.rglob("*"))
    assert main(["--state-dir", make(tmp_path), *args]) == 2
    assert words in one_error_line(capsys)
    assert sorted(tmp_path.rglob("*")) == sorted(set(before) | set(tmp_path.iterdir()))


def test_netns_mounted_tells_a_network_namespace_from_a_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to("/proc/self/ns/net")
    monkeypatch.setattr(netns, "NETNS_DIR", str(tmp_path))
    assert [netns.netns_mounted(n) for n in ("file", "dir", "link", "gone")] == [False] * 4


@pytest.mark.parametrize("kind", ["file", "dir", "link"])
def test_host_netns_must_be_a_mounted_network_namespace(
        state: Path, tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run-netns"
    run.mkdir()
    {"file": lambda p: p.write_text(""), "dir": lambda p: p.mkdir(),
     "link": lambda p: p.symlink_to("/proc/self/ns/net")}[kind](run / "fake")
    monkeypatch.setattr(netns, "NETNS_DIR", str(run))
    assert hnsctl(state, "--host-netns", "fake", "network", "list") == 2
    assert "not a network namespace" in one_error_line(capsys)


@pytest.mark.parametrize(("args", "words"), [
    (["vm", "delete", "bad name!"], "invalid vm name"),
    (["vm", "delete", ""], "invalid vm name"),
    (["vm", "delete", "x" * 33], "invalid vm name"),
    (["network", "delete", "bad name!"], "invalid network name"),
    (["network", "delete", "-x", "--force"], "required: name"),
    (["network", "delete", "../n"], "invalid network name"),
    (["portmap", "delete", "bad name!", "--protocol", "tcp", "--external-port", "80"],
     "invalid vm name"),
    (["vm", "list", "--network", ""], "invalid network name"),
    (["network", "create", "n2", "--type", "nat", "--mtu", "\u0661\u0665\u0660\u0660"],
     "invalid MTU"),
    (["network", "create", "n2", "--type", "nat", "--mtu", "1500 "], "invalid MTU"),
    (["network", "create", "n2", "--type", "nat", "--mtu", "9" * 5000], "invalid MTU"),
    (["network", "create", "n2", "--type", "nat", "--localhost-forwarding", "\u0661"],
     "invalid --localhost-forwarding"),
    (["network", "create", "n2", "--type", "mirrored", "--ignored-ports", "22,\u0668\u0660"],
     "invalid"),
    (["portproxy", "add", "v4tov4", "listenport=\u0668\u0660"], "invalid listenport"),
    (["portproxy", "add", "v4tov4", "listenport=²"], "invalid listenport"),
    (["portproxy", "add", "v4tov4", "listenport=80", "connectport=\u00b3"],
     "invalid connectport"),
    (["portproxy", "delete", "v4tov4", "listenport=\u0968\u0966"], "invalid listenport"),
    (["portproxy", "add", "v6tov6", "listenport=80", "listenaddress=fe80::1%a\nb"],
     "invalid listenaddress"),
    (["network", "list", "a\nb"], "unrecognized arguments: a\\nb"),
])
def test_bad_input_of_this_issue_is_one_line_exit_2(state: Path, seeded: tuple[Network, Vm],
                                                   args: list[str], words: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(state)
    try:
        rc = hnsctl(state, *args)
    except SystemExit as exc:  # argparse
        rc = int(str(exc.code))
    assert rc == 2
    assert words in one_error_line(capsys)
    assert snapshot(state) == before


def test_an_unexpected_exception_is_one_line_and_exit_1(
        state: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def boom(self: object) -> NoReturn:
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr(service.Service, "list_networks", boom)
    assert hnsctl(state, "network", "list") == 1
    assert one_error_line(capsys) == (
        "hnsctl: error: unexpected error (RuntimeError): first line; second line")
    assert hnsctl(state, "--debug", "network", "list") == 1
    _out, err = capsys.readouterr()
    assert "Traceback" in err and err.splitlines()[-1].startswith(PREFIX)


def test_a_closed_stdout_ends_quietly(state: Path) -> None:
    """``hnsctl ... | head -1``: more output than a pipe holds, the reader gone."""
    store = Store(state)
    with store.write() as tx:
        for i in range(300):
            net_id = str(uuid.uuid4())
            tx.insert_network(Network(
                id=net_id, name=f"n{i}", type=NetworkType.NAT,
                subnet=IPv4Network(f"10.{i // 256}.{i % 256}.0/24"),
                gateway=IPv4Address(f"10.{i // 256}.{i % 256}.1"), mtu=1500,
                bridge=naming.bridge_name(store.instance, net_id)))
    store.close()
    for args in (["--json", "network", "list"], ["network", "list"], ["--help"]):
        proc = subprocess.Popen([sys.executable, "-m", "hns.cli", "--state-dir", str(state),
                                 *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.read(10)
        proc.stdout.close()  # the reader goes away while hnsctl still writes
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 0, err
        assert err == b""
