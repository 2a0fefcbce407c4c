"""``hnsctl capture`` in a sandbox: pcap files that tcpdump reads, on a VM's host veth
and on a network's bridge; a line per packet; SIGINT; a bad filter; and the Recorder."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hns.capture import recorder_for
from hns.testing import Sandbox, SandboxVm

START_TIMEOUT = 20.0
END_TIMEOUT = 20.0


class Capture:
    """``hnsctl capture`` as a subprocess; its stderr read as it comes (binary, so
    nothing read early is lost to a buffer when the rest is collected)."""

    def __init__(self, sandbox: Sandbox, *args: str) -> None:
        self.proc = subprocess.Popen([*sandbox.hnsctl_argv(), "capture", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.err = b""

    def wait_listening(self) -> None:
        """Until the line that says the socket listens (or the process ends)."""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + START_TIMEOUT
        while b"capturing on " not in self.err or not self.err.endswith(b"\n"):
            left = deadline - time.monotonic()
            assert left > 0, f"capture did not start: {self.err!r}"
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 4096)
                assert chunk, f"capture ended early: {self.err!r}"
                self.err += chunk

    def finish(self) -> tuple[int, str, str]:
        """Its exit code, stdout and whole stderr once it ends by itself."""
        out, err = self.proc.communicate(timeout=END_TIMEOUT)
        return self.proc.returncode, out.decode(), (self.err + err).decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=END_TIMEOUT)


@pytest.fixture
def captures() -> Iterator[list[Capture]]:
    made: list[Capture] = []
    yield made
    for c in made:
        c.kill()


def start(captures: list[Capture], sandbox: Sandbox, *args: str) -> Capture:
    c = Capture(sandbox, *args)
    captures.append(c)
    c.wait_listening()
    return c


def tcpdump_read(path: Path, *extra: str) -> list[str]:
    result = subprocess.run(["tcpdump", "-r", str(path), "-nn", *extra], capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def ping(vm: SandboxVm, address: str, n: int) -> None:
    result = vm.run(["ping", "-c", str(n), "-i", "0.2", "-W", "5", address])
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_vm_capture_writes_the_pings_tcpdump_reads(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                                     captures: list[Capture],
                                                     tmp_path: Path) -> None:
    path = tmp_path / "vm.pcap"
    c = start(captures, hns_sandbox, nat_vm.name, "icmp", "-w", str(path), "--count", "6")
    ping(nat_vm, nat_vm.gateway, 3)
    code, out, err = c.finish()
    assert code == 0, err
    assert out == ""
    assert "captured 6 packets" in err and "(count reached)" in err
    lines = tcpdump_read(path)
    requests = [x for x in lines if f"{nat_vm.ip} > {nat_vm.gateway}: ICMP echo request" in x]
    replies = [x for x in lines if f"{nat_vm.gateway} > {nat_vm.ip}: ICMP echo reply" in x]
    assert (len(lines), len(requests), len(replies)) == (6, 3, 3)


def test_a_network_capture_sees_the_vms_datagrams_on_the_bridge(
        hns_sandbox: Sandbox, nat_vm: SandboxVm, captures: list[Capture],
        tmp_path: Path) -> None:
    path = tmp_path / "bridge.pcap"
    marker = f"hns-capture-{os.getpid()}"
    c = start(captures, hns_sandbox, nat_vm.info.network, "udp", "port", "9999",
              "-w", str(path), "--count", "3", "--json")
    for i in range(3):
        sent = nat_vm.run(["socat", "-u", "-", f"UDP:{hns_sandbox.outside_ip}:9999"],
                          input=f"{marker}-{i}\n")
        assert sent.returncode == 0, sent.stderr
    code, out, err = c.finish()
    assert code == 0, err
    summary = json.loads(out)
    bridge = hns_sandbox.service.get_network(nat_vm.info.network).bridge
    assert (summary["Interface"], summary["Packets"], summary["File"]) == \
        (bridge, 3, str(path))
    lines = tcpdump_read(path, "-A")
    headers = [x for x in lines if f"> {hns_sandbox.outside_ip}.9999: UDP" in x]
    assert len(headers) == 3 and all(x.split()[1] == "IP" for x in headers)
    assert all(x.split()[2].startswith(f"{nat_vm.ip}.") for x in headers)
    carried = [i for i in range(3) if any(f"{marker}-{i}" in x for x in lines)]
    assert carried == [0, 1, 2]


def test_without_a_file_a_line_per_packet(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                          captures: list[Capture], tmp_path: Path) -> None:
    c = start(captures, hns_sandbox, nat_vm.name, "icmp", "--count", "4")
    ping(nat_vm, nat_vm.gateway, 2)
    code, out, err = c.finish()
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 4
    assert [f"ICMP {nat_vm.ip} > {nat_vm.gateway} echo-request" in x for x in lines] == \
        [True, False, True, False]
    assert [f"ICMP {nat_vm.gateway} > {nat_vm.ip} echo-reply" in x for x in lines] == \
        [False, True, False, True]
    assert all(x.endswith(" len 98") for x in lines)     # 14 + 20 + 8 + 56
    assert os.listdir(tmp_path) == []


def test_sigint_ends_a_capture_with_a_readable_file(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                                    captures: list[Capture],
                                                    tmp_path: Path) -> None:
    path = tmp_path / "int.pcap"
    c = start(captures, hns_sandbox, nat_vm.info.network, "-w", str(path))
    ping(nat_vm, hns_sandbox.outside_ip, 2)
    c.proc.send_signal(signal.SIGINT)
    code, out, err = c.finish()
    assert code == 0, err
    assert out == "" and "(interrupted)" in err
    lines = tcpdump_read(path)
    assert len([x for x in lines if f"{nat_vm.ip} > {hns_sandbox.outside_ip}: ICMP echo "
                                    "request" in x]) == 2
    assert len([x for x in lines if f"{hns_sandbox.outside_ip} > {nat_vm.ip}: ICMP echo "
                                    "reply" in x]) == 2
    assert f"captured {len(lines)} packets" in err


def test_a_duration_ends_a_capture(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                   captures: list[Capture], tmp_path: Path) -> None:
    path = tmp_path / "d.pcap"
    began = time.monotonic()
    c = start(captures, hns_sandbox, nat_vm.name, "-w", str(path), "--duration", "0.5")
    code, _, err = c.finish()
    assert code == 0, err
    assert time.monotonic() - began >= 0.5
    assert "(time up)" in err
    tcpdump_read(path)


@pytest.mark.parametrize("args", [["tcp", "port", "-w"], ["not", "a", "filter", "(((", "-w"],
                                  ["--count", "0", "-w"], ["--duration", "nan", "-w"]])
def test_bad_input_is_exit_2_one_line_no_file(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                              tmp_path: Path, args: list[str]) -> None:
    path = tmp_path / "bad.pcap"
    result = hns_sandbox.hnsctl("capture", nat_vm.name, *args, str(path))
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "error: bad " in result.stderr
    assert result.stdout == "" and not path.exists()


def test_an_unknown_name_is_exit_2(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                   tmp_path: Path) -> None:
    path = tmp_path / "none.pcap"
    result = hns_sandbox.hnsctl("capture", "nobody", "-w", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().endswith("no vm or network named 'nobody'")
    assert not path.exists()


def test_a_recorder_records_the_traffic(hns_sandbox: Sandbox, nat_vm: SandboxVm,
                                        tmp_path: Path) -> None:
    path = tmp_path / "rec.pcap"
    rec = recorder_for(hns_sandbox.service, nat_vm.name, str(path), "icmp")
    try:
        rec.start()
        ping(nat_vm, nat_vm.gateway, 2)
        written = rec.stop()
    finally:
        rec.stop()
    lines = tcpdump_read(path)
    assert written == len(lines) == 4
    assert len([x for x in lines if "ICMP echo request" in x]) == 2
