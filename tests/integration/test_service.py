"""hns as a service: ``up`` starts the daemon and ``down`` stops it, the daemon heals
drift, VMs stop and start, idle VMs are reclaimed, the settings file is read and
reloaded.  Real kernel objects, real nft, real clients (curl, dig, socat)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.nsutil import (
    DNS_ADDRESS,
    DNS_NAME,
    curl,
    refused,
    serve_http_peer_echo,
    start_dnsmasq,
    stop,
    wait_for,
)

from hns.testing import Sandbox, SandboxVm


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def status(sandbox: Sandbox) -> dict[str, Any]:
    return dict(json.loads(ok(sandbox.hnsctl("--json", "status"))))


def vm_json(sandbox: Sandbox, name: str = "wsl") -> dict[str, Any]:
    return dict(json.loads(ok(sandbox.hnsctl("--json", "vm", "show", name))))


def daemon_pid(sandbox: Sandbox) -> int:
    return int(Path(sandbox.state_dir, "daemon.spawned").read_text())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def repairs(sandbox: Sandbox) -> int:
    return int(status(sandbox)["Healing"]["Repairs"])


@pytest.fixture
def up(hns_sandbox: Sandbox) -> Sandbox:
    """``hnsctl up`` with a resolver for the host (dnsmasq outside)."""
    hns_sandbox.set_host_resolv(f"nameserver {hns_sandbox.outside_ip}\n")
    start_dnsmasq(hns_sandbox)
    never = write_config(hns_sandbox, "[wsl2]\nvmIdleTimeout=-1\n")   # not reclaimed
    out = ok(hns_sandbox.hnsctl("--config", never, "up"))
    assert "daemon: started (pid" in out
    return hns_sandbox


def test_up_gives_localhost_forwarding_and_dns_at_once(up: Sandbox) -> None:
    answer = status(up)
    assert answer["Running"] is True and answer["Healing"]["Enabled"] is True
    vm = up.service.get_vm("wsl")
    server = serve_http_peer_echo(SandboxVm(vm), 8000)
    try:
        wait_for(lambda: curl(up.host, "http://127.0.0.1:8000/").returncode == 0,
                 "localhost:8000 to reach the VM")
        dig = ok(up.hnsctl("vm", "exec", "wsl", "--", "dig", "+short", "+time=2",
                           f"@{vm.gateway}", DNS_NAME))
        assert dig.strip() == DNS_ADDRESS
    finally:
        stop(server)


def test_down_stops_the_daemon_and_leaves_nothing(up: Sandbox) -> None:
    pid = daemon_pid(up)
    removed = json.loads(ok(up.hnsctl("down", "--json")))["Removed"]
    assert removed == ["vm wsl", "network WSL", f"daemon (pid {pid})"]
    wait_for(lambda: not alive(pid), "the daemon to exit")
    assert status(up)["Running"] is False
    assert not Path(up.state_dir, "daemon.spawned").exists()
    tables = ok(up.host.run(["nft", "list", "tables"]))
    assert f"hns-{up.service.instance}" not in tables


def test_a_second_up_finds_the_daemon_running(up: Sandbox) -> None:
    pid = daemon_pid(up)
    out = ok(up.hnsctl("up"))
    assert f"daemon: running (pid {pid})" in out


def test_no_daemon_is_started_when_asked(hns_sandbox: Sandbox) -> None:
    out = ok(hns_sandbox.hnsctl("up", "--no-daemon"))
    assert "daemon: not started (--no-daemon)" in out
    assert status(hns_sandbox)["Running"] is False
    made = hns_sandbox.hnsctl("portproxy", "add", "v4tov4", "listenport=9000",
                              "connectaddress=172.16.0.2")
    assert made.returncode == 0
    assert "no daemon serves" in made.stderr


# healing


def test_a_flushed_ruleset_is_healed_and_outbound_works_again(up: Sandbox) -> None:
    vm = up.service.get_vm("wsl")
    ping = ["vm", "exec", "wsl", "--", "ping", "-c1", "-W2", up.outside_ip]
    ok(up.hnsctl(*ping))
    ok(up.host.run(["nft", "flush", "ruleset"]))
    wait_for(lambda: up.hnsctl(*ping).returncode == 0, "outbound to work again")
    assert status(up)["Healing"]["ByKind"].get("nft", 0) >= 1
    recent = status(up)["Healing"]["Recent"]
    assert any(r["Kind"] == "nft" and "was gone" in r["Why"] for r in recent)
    text = ok(up.hnsctl("status"))
    assert "healing: on," in text and "nft " in text
    assert vm_json(up)["IpAddress"] == str(vm.ip)


@pytest.mark.parametrize("what", ["veth", "bridge", "netns", "address"])
def test_a_deleted_kernel_object_comes_back_with_the_same_address_and_mac(
        up: Sandbox, what: str) -> None:
    vm = up.service.get_vm("wsl")
    net = up.service.get_network("WSL")
    before = repairs(up)
    argv = {"veth": ["ip", "link", "del", vm.host_ifname],
            "bridge": ["ip", "link", "del", net.bridge],
            "netns": ["ip", "netns", "del", vm.netns],
            "address": ["ip", "addr", "flush", "dev", net.bridge]}[what]
    if what == "netns":
        ok(subprocess.run(argv, capture_output=True, text=True))     # ip netns is global
    else:
        ok(up.host.run(argv))
    ping = ["vm", "exec", "wsl", "--", "ping", "-c1", "-W2", str(net.gateway)]
    wait_for(lambda: up.hnsctl(*ping).returncode == 0, f"the {what} to come back")
    assert repairs(up) > before
    shown = vm_json(up)
    assert (shown["IpAddress"], shown["MacAddress"]) == (str(vm.ip), vm.mac)
    mac = ok(up.hnsctl("vm", "exec", "wsl", "--", "cat", "/sys/class/net/eth0/address"))
    assert mac.strip() == vm.mac


def test_an_overwritten_resolv_conf_is_written_again(up: Sandbox) -> None:
    vm = up.service.get_vm("wsl")
    path = Path("/etc/netns", vm.netns, "resolv.conf")
    path.write_text("nameserver 192.0.2.99\n")
    wait_for(lambda: f"nameserver {vm.gateway}" in path.read_text(), "resolv.conf back")


def test_what_hns_deleted_stays_deleted(up: Sandbox) -> None:
    ok(up.hnsctl("vm", "create", "extra", "--network", "WSL"))
    extra = up.service.get_vm("extra")
    ok(up.hnsctl("vm", "delete", "extra"))
    before, rounds = repairs(up), status(up)["Healing"]["Rounds"]
    # two rounds more: one at least began after the delete (a full one: the state changed)
    wait_for(lambda: status(up)["Healing"]["Rounds"] >= rounds + 2, "healing rounds")
    assert status(up)["Healing"]["Error"] is None
    ok(up.hnsctl("vm", "exec", "wsl", "--", "true"))
    assert repairs(up) == before
    assert not Path("/run/netns", extra.netns).exists()


# the VM lifecycle


def test_stop_and_start_keep_address_mac_and_mappings(up: Sandbox) -> None:
    vm = up.service.get_vm("wsl")
    ok(up.hnsctl("portmap", "add", "wsl", "--protocol", "tcp",
                 "--external-port", "8080", "--internal-port", "80"))
    ok(up.hnsctl("vm", "stop", "wsl"))
    listed = json.loads(ok(up.hnsctl("--json", "vm", "list")))
    assert [v["State"] for v in listed] == ["Stopped"]
    assert not Path("/run/netns", vm.netns).exists()
    assert "STOPPED" not in ok(up.hnsctl("vm", "list")) and \
        "Stopped" in ok(up.hnsctl("vm", "list"))
    assert refused(up.outside, f"http://{up.uplink_ip}:8080/")     # refused, not dropped
    ok(up.hnsctl("vm", "start", "wsl"))
    shown = vm_json(up)
    assert (shown["State"], shown["IpAddress"], shown["MacAddress"]) == (
        "Running", str(vm.ip), vm.mac)
    server = serve_http_peer_echo(SandboxVm(vm), 80)
    try:
        wait_for(lambda: curl(up.outside, f"http://{up.uplink_ip}:8080/").returncode == 0,
                 "the mapping to work again")
    finally:
        stop(server)


def test_exec_on_a_stopped_vm_starts_it(up: Sandbox) -> None:
    ok(up.hnsctl("vm", "stop", "wsl"))
    assert ok(up.hnsctl("vm", "exec", "wsl", "--", "echo", "hello")).strip() == "hello"
    assert vm_json(up)["State"] == "Running"


def test_up_starts_a_stopped_wsl(up: Sandbox) -> None:
    ok(up.hnsctl("vm", "stop", "wsl"))
    ok(up.hnsctl("up"))
    assert vm_json(up)["State"] == "Running"


def test_an_idle_vm_is_reclaimed_and_a_busy_one_is_not(up: Sandbox) -> None:
    ok(up.hnsctl("vm", "create", "busy", "--network", "WSL", "--idle-timeout", "1000"))
    sleeper = subprocess.Popen([*up.hnsctl_argv(), "vm", "exec", "busy", "--", "sleep", "60"])
    try:
        busy = up.service.get_vm("busy")
        wait_for(lambda: ok(subprocess.run(["ip", "netns", "pids", busy.netns],
                                           capture_output=True, text=True)).strip() != "",
                 "the process inside the busy VM")
        ok(up.hnsctl("vm", "create", "idle", "--network", "WSL", "--idle-timeout", "300"))
        ok(up.hnsctl("vm", "create", "kept", "--network", "WSL"))
        wait_for(lambda: vm_json(up, "idle")["State"] == "Stopped", "the idle VM to stop")
        time.sleep(2.5)       # more than the busy VM's timeout (behaviour, not speed)
        reclaimed = [r["Vm"] for r in status(up)["Reclaimed"]]
        assert "idle" in reclaimed
        assert "busy" not in reclaimed and "kept" not in reclaimed
        assert vm_json(up, "busy")["State"] == "Running"
        assert vm_json(up, "kept")["State"] == "Running"
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait(10)


# settings


def write_config(sandbox: Sandbox, text: str) -> str:
    path = Path(sandbox.state_dir) / "wslconfig"      # removed with the sandbox
    path.write_text(text)
    return str(path)


def test_config_show_names_where_each_value_came_from(hns_sandbox: Sandbox) -> None:
    path = write_config(hns_sandbox, "[wsl2]\nnetworkingMode=mirrored\nmemory=4GB\n")
    try:
        shown = hns_sandbox.hnsctl("--config", path, "--json", "config", "show")
        found = json.loads(ok(shown))
        assert found["networkingMode"] == {"Value": "mirrored", "Source": "file",
                                           "Where": f"{path}:2"}
        assert found["firewall"]["Source"] == "default"
        assert f"{path}:3" in shown.stderr and "memory" in shown.stderr
    finally:
        os.unlink(path)


def test_a_bad_value_is_refused_with_file_and_line_and_changes_nothing(
        hns_sandbox: Sandbox) -> None:
    path = write_config(hns_sandbox, "[wsl2]\n\nvmIdleTimeout=soon\n")
    try:
        result = hns_sandbox.hnsctl("--config", path, "up")
        assert result.returncode == 2
        assert result.stderr.startswith(f"hnsctl: error: {path}:3:")
        assert len(result.stderr.strip().splitlines()) == 1
        assert json.loads(ok(hns_sandbox.hnsctl("--json", "network", "list"))) == []
    finally:
        os.unlink(path)


def test_the_settings_file_shapes_up_and_reload_applies_live_keys(
        hns_sandbox: Sandbox) -> None:
    path = write_config(hns_sandbox, "[wsl2]\nvmIdleTimeout=-1\nlocalhostForwarding=false\n"
                                     "[hns]\nsubnet=10.77.0.0/24\n")
    try:
        ok(hns_sandbox.hnsctl("--config", path, "up", "--no-daemon"))
        net = json.loads(ok(hns_sandbox.hnsctl("--json", "network", "show", "WSL")))
        assert net["Ipams"][0]["Subnets"][0]["IpAddressPrefix"] == "10.77.0.0/24"
        assert net["LocalhostForwarding"] is False
        assert vm_json(hns_sandbox)["IdleTimeout"] == -1
        Path(path).write_text("[wsl2]\nvmIdleTimeout=120000\nlocalhostForwarding=true\n"
                              "networkingMode=mirrored\n[hns]\nsubnet=10.77.0.0/24\n")
        result = hns_sandbox.hnsctl("--config", path, "--json", "reload")
        answer = json.loads(ok(result))
        assert set(answer["Applied"]) == {"vmIdleTimeout", "localhostForwarding"}
        assert answer["NeedsRestart"] == ["networkingMode"]
        assert vm_json(hns_sandbox)["IdleTimeout"] == 120000
        net = json.loads(ok(hns_sandbox.hnsctl("--json", "network", "show", "WSL")))
        assert net["LocalhostForwarding"] is True
    finally:
        os.unlink(path)


def test_dns_proxy_off_gives_the_vm_the_host_resolvers(hns_sandbox: Sandbox) -> None:
    hns_sandbox.set_host_resolv(f"nameserver {hns_sandbox.outside_ip}\n")
    start_dnsmasq(hns_sandbox)
    path = write_config(hns_sandbox, "[wsl2]\ndnsProxy=false\nvmIdleTimeout=-1\n")
    ok(hns_sandbox.hnsctl("--config", path, "up"))
    vm = hns_sandbox.service.get_vm("wsl")
    assert json.loads(ok(hns_sandbox.hnsctl("--json", "network", "show", "WSL")))[
        "DnsProxy"] is False
    resolv = Path("/etc/netns", vm.netns, "resolv.conf").read_text()
    assert f"nameserver {hns_sandbox.outside_ip}" in resolv
    assert f"nameserver {vm.gateway}" not in resolv
    assert status(hns_sandbox)["Dns"] == []             # nothing listens on the gateway
    dig = ok(hns_sandbox.hnsctl("vm", "exec", "wsl", "--", "dig", "+short", "+time=2",
                                DNS_NAME))               # through the host's resolver
    assert dig.strip() == DNS_ADDRESS
