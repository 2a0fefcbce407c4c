"""hns.diag without the kernel: steps and reports (JSON, text, where it breaks), --target,
the path MTU search, and the order of the steps, their skips and hints run on fake
probes over the service's in-memory kernel."""

from __future__ import annotations

import argparse
import dataclasses
import json
import struct
from collections.abc import Callable, Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from hns import diag
from hns.diag import STEPS, Echo, Outcome, Report, Step, diagnose, next_sizes, search_mtu
from hns.diag_probes import IFREQ_SIZE, parse_ifconf, parse_routes
from hns.errors import InvalidRequest, NotFound
from hns.fake_kernel import FakeKernel
from hns.service import Service
from nat.nft import FakeNft

# Step and Report


def step(name: str, ok: bool | None, detail: str = "d", hint: str = "") -> Step:
    return Step(name, ok, 0.0012, detail, hint)


def test_a_step_in_json_has_the_names_the_plugin_reads() -> None:
    got = [step("arp-gateway", ok, "who-has", "h").to_json() for ok in (True, False, None)]
    assert [g["Result"] for g in got] == ["pass", "fail", "skip"]
    assert got[0] == {"Name": "arp-gateway", "Result": "pass", "Seconds": 0.0012,
                      "Detail": "who-has", "Hint": "h"}


def test_a_report_is_ok_unless_a_step_failed_skips_do_not_count() -> None:
    assert Report("v", (step("vm-netns", True), step("tcp-target", None))).ok
    assert not Report("v", (step("vm-netns", True), step("daemon", False))).ok


def test_it_breaks_at_the_first_failure_no_other_failure_explains() -> None:
    report = Report("v", (step("vm-netns", True), step("dns-gateway", False, "refused"),
                          step("path-mtu", False, "fragmented"),
                          step("daemon", False, "no daemon")))
    found = report.breaks_at()
    assert found is not None
    root, caused, others = found
    assert (root.name, [s.name for s in caused], [s.name for s in others]) == \
        ("path-mtu", [], ["daemon"])
    assert report.summary() == "breaks at path-mtu: fragmented; also failing: daemon"
    alone = Report("v", (step("dns-gateway", False), step("daemon", False, "gone")))
    assert alone.summary() == "breaks at daemon: gone; dns-gateway fails because of it"


def test_a_tcp_failure_is_explained_by_a_missing_route_or_nat() -> None:
    for cause in ("address-route", "host-nat"):
        report = Report("v", (step(cause, False, "x"), step("tcp-target", False)))
        assert report.summary() == f"breaks at {cause}: x; tcp-target fails because of it"
    alone = Report("v", (step("host-nat", True), step("tcp-target", False, "timeout")))
    assert alone.summary() == "breaks at tcp-target: timeout"


def test_the_text_has_a_line_per_step_hints_under_failures_and_a_verdict() -> None:
    report = Report("v0", (step("vm-netns", True, "eth0 up"),
                           step("address-route", False, "no default route", "hnsctl restore"),
                           step("tcp-target", None, "no --target ADDR:PORT given")))
    lines = report.text().splitlines()
    assert lines[0] == "diag of vm v0"
    assert lines[1].split() == ["STEP", "RESULT", "TIME", "DETAIL"]
    assert lines[2].split()[:4] == ["vm-netns", "PASS", "1.2", "ms"]
    assert lines[3].split()[:2] == ["address-route", "FAIL"]
    assert lines[4].strip() == "hint: hnsctl restore"
    assert lines[5].split()[:3] == ["tcp-target", "SKIP", "-"]
    assert lines[-1] == "breaks at address-route: no default route"
    healthy = Report("v0", (step("vm-netns", True), step("tcp-target", None)))
    assert healthy.text().splitlines()[-1] == "all steps passed (1 skipped)"
    assert "hint" not in healthy.text()


def test_the_report_in_json_round_trips() -> None:
    report = Report("v0", (step("vm-netns", True), step("daemon", False, "gone", "h")))
    data = json.loads(json.dumps(report.to_json()))
    assert (data["Vm"], data["Ok"], data["BreaksAt"]) == ("v0", False, "daemon")
    assert [s["Name"] for s in data["Steps"]] == ["vm-netns", "daemon"]
    assert data["Summary"] == report.summary()


# --target


@pytest.mark.parametrize(("text", "want"), [
    ("198.51.100.1:80", ("198.51.100.1", 80)),
    ("10.0.0.1:65535", ("10.0.0.1", 65535)),
    ("10.0.0.1:1", ("10.0.0.1", 1)),
    ("[2001:db8::1]:443", ("2001:db8::1", 443)),
    ("[2001:DB8:0::1]:8080", ("2001:db8::1", 8080)),
])
def test_a_target_is_an_address_and_a_port(text: str, want: tuple[str, int]) -> None:
    assert diag.parse_target(text) == want


@pytest.mark.parametrize("text", [
    "", ":", "198.51.100.1", "198.51.100.1:", ":80", "198.51.100.1:0", "198.51.100.1:65536",
    "198.51.100.1:99999999", "198.51.100.1:-1", "198.51.100.1:+80", "198.51.100.1:8 0",
    "198.51.100.1:\uff18\uff10", "example.com:80", "2001:db8::1:80", "[198.51.100.1]:80",
    "198.51.100.300:80", "[2001:db8::1]", "[]:80",
])
def test_a_bad_target_is_refused_in_one_line(text: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        diag.parse_target(text)
    assert "\n" not in str(exc.value) and "--target" in str(exc.value)


# the path MTU search


def test_next_sizes_are_spread_strictly_between_the_bounds() -> None:
    assert next_sizes(1400, 1401, 12) == []
    assert next_sizes(1400, 1404, 12) == [1401, 1402, 1403]
    sizes = next_sizes(67, 1500, 12)
    assert len(sizes) == 12 and sizes == sorted(set(sizes))
    assert sizes[0] > 67 and sizes[-1] < 1500
    gaps = [b - a for a, b in zip([67, *sizes], [*sizes, 1500], strict=True)]
    assert max(gaps) - min(gaps) <= 1


def path(limit: int, fragments: bool) -> tuple[Callable[[Sequence[int]], dict[int, Echo]],
                                                list[list[int]]]:
    """A path that carries ``limit`` bytes whole; bigger echoes come back in fragments
    (of the limit, rounded down to 8 bytes of payload as Linux does) or not at all."""
    rounds: list[list[int]] = []

    def probe(sizes: Sequence[int]) -> dict[int, Echo]:
        rounds.append(list(sizes))
        first = 20 + (limit - 20) // 8 * 8
        return {s: Echo("whole") if s <= limit else
                (Echo("fragmented", first) if fragments else Echo("lost")) for s in sizes}
    return probe, rounds


def test_a_healthy_path_takes_one_round() -> None:
    probe, rounds = path(1500, fragments=True)
    found = search_mtu(probe, 1500, extra=(1500,))
    assert found.ok and found.largest == 1500 and found.exact
    assert rounds == [[1500]]


@pytest.mark.parametrize("limit", [1400, 1401, 1407, 1280, 576, 100])
def test_a_fragmented_reply_points_straight_at_the_limit(limit: int) -> None:
    probe, rounds = path(limit, fragments=True)
    found = search_mtu(probe, 1500)
    assert not found.ok and found.echoes[1500].kind == "fragmented"
    assert (found.largest, found.exact, found.rounds) == (limit, True, 2)
    assert found.probes == sum(len(r) for r in rounds) <= 9


@pytest.mark.parametrize("limit", [*range(68, 1500, 61), 1499, 68])
def test_lost_echoes_are_searched_exactly_in_four_rounds(limit: int) -> None:
    probe, rounds = path(limit, fragments=False)
    found = search_mtu(probe, 1500)
    assert (found.largest, found.exact) == (limit, True)
    assert len(rounds) <= 4 and all(len(r) <= 12 for r in rounds)


def test_nothing_that_passes_gives_no_largest_size() -> None:
    probe, rounds = path(0, fragments=False)
    found = search_mtu(probe, 1500, rounds=3)
    assert found.largest is None and not found.ok and len(rounds) == 3


def test_the_network_mtu_is_probed_in_the_first_round() -> None:
    probe, rounds = path(1450, fragments=False)
    found = search_mtu(probe, 1500, extra=(1450, 9000, 10))
    assert rounds[0] == [1450, 1500]
    assert found.echoes[1450] == Echo("whole") and found.largest == 1450 and found.exact


# the pure parsers of the kernel's answers


def test_routes_of_proc_net_route_by_interface() -> None:
    def hexaddr(a: str) -> str:
        return f"{struct.unpack('<I', IPv4Address(a).packed)[0]:08X}"

    text = ("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
            f"eth0\t00000000\t{hexaddr('172.16.0.1')}\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
            f"eth0\t{hexaddr('172.16.0.0')}\t00000000\t0001\t0\t0\t0\t{hexaddr('255.255.240.0')}"
            "\t0\t0\t0\n"
            f"eth1\t{hexaddr('10.0.0.0')}\t00000000\t0001\t0\t0\t0\t{hexaddr('255.0.0.0')}"
            "\t0\t0\t0\n")
    assert parse_routes(text, "eth0") == [
        (IPv4Network("0.0.0.0/0"), IPv4Address("172.16.0.1")),
        (IPv4Network("172.16.0.0/20"), None)]
    assert parse_routes(text, "eth2") == []


def test_addresses_of_an_ifconf_array_by_interface() -> None:
    def ifreq(name: str, addr: str) -> bytes:
        entry = name.encode().ljust(16, b"\0") + struct.pack("<HH", 2, 0) + \
            IPv4Address(addr).packed
        return entry.ljust(IFREQ_SIZE, b"\0")

    raw = ifreq("lo", "127.0.0.1") + ifreq("eth0", "172.16.0.2") + \
        ifreq("eth0:1", "172.16.0.9") + ifreq("eth00", "10.0.0.1")
    assert parse_ifconf(raw, "eth0") == [IPv4Address("172.16.0.2"), IPv4Address("172.16.0.9")]
    assert parse_ifconf(raw[:-1], "eth00") == []      # a cut entry is not read


# diagnose on fake probes


class FakeProbes:
    """Every probe passes unless ``fail`` says otherwise (step -> Outcome); each call is
    written down."""

    def __init__(self, fail: dict[str, Outcome | BaseException] | None = None,
                 limit: int = 1500, mtus: dict[str, int] | None = None) -> None:
        self.fail = fail or {}
        self.limit = limit
        self.mtus = mtus or {}
        self.calls: list[str] = []
        self.closed = False

    def _probe(self, name: str, value: str = "") -> Outcome:
        self.calls.append(name)
        got = self.fail.get(name)
        if isinstance(got, BaseException):
            raise got
        return got or Outcome(True, f"{name} fine", value=value)

    def vm_netns(self) -> Outcome:
        return self._probe("vm-netns")

    def address_route(self) -> Outcome:
        return self._probe("address-route")

    def arp_gateway(self) -> Outcome:
        return self._probe("arp-gateway", "02:15:5d:00:00:01")

    def icmp_gateway(self) -> Outcome:
        return self._probe("icmp-gateway")

    def dns_gateway(self) -> Outcome:
        return self._probe("dns-gateway")

    def tcp_target(self, target: tuple[str, int]) -> Outcome:
        return self._probe("tcp-target")

    def df_echoes(self, gateway_mac: str, sizes: Sequence[int]) -> dict[int, Echo]:
        assert gateway_mac == "02:15:5d:00:00:01"
        self.calls.append("df")
        return {s: Echo("whole") if s <= self.limit else Echo("fragmented", self.limit - 4)
                for s in sizes}

    def host_mtus(self) -> dict[str, int]:
        return self.mtus

    def host_nat(self) -> Outcome:
        return self._probe("host-nat")

    def daemon(self) -> Outcome:
        return self._probe("daemon")

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    with Service(tmp_path / "state", nft=FakeNft(), kernel=FakeKernel()) as service:
        service.create_network("n", "nat", subnet="10.50.0.0/24")
        service.create_vm("v", "n")
        yield service


def run(svc: Service, probes: FakeProbes, target: tuple[str, int] | None = None,
        vm: str = "v") -> dict[str, Step]:
    report = diagnose(svc, vm, target, probes=lambda s, v, n: probes)
    assert [s.name for s in report.steps] == list(STEPS) and probes.closed
    return {s.name: s for s in report.steps}


def test_every_step_passes_on_a_healthy_vm_and_tcp_waits_for_a_target(svc: Service) -> None:
    probes = FakeProbes()
    steps = run(svc, probes)
    assert {n for n, s in steps.items() if s.ok is not True} == {"tcp-target"}
    assert steps["tcp-target"].detail == "no --target ADDR:PORT given"
    assert "tcp-target" not in probes.calls and probes.calls.count("df") == 1
    steps = run(svc, FakeProbes(), ("198.51.100.1", 80))
    assert all(s.ok for s in steps.values())


def test_without_a_namespace_only_the_host_side_runs(svc: Service) -> None:
    probes = FakeProbes({"vm-netns": Outcome(False, "vm v is stopped", "stopped")})
    steps = run(svc, probes, ("198.51.100.1", 80))
    inside = ["address-route", "arp-gateway", "icmp-gateway", "dns-gateway", "tcp-target",
              "path-mtu"]
    assert all(steps[n].ok is None for n in inside)
    assert {steps[n].detail for n in inside} == {
        "not run: vm-netns failed (no namespace or eth0 to probe from)"}
    assert probes.calls == ["vm-netns", "host-nat", "daemon"]
    assert steps["vm-netns"].hint == "hnsctl vm start v"
    assert steps["host-nat"].ok and steps["daemon"].ok


def test_a_missing_default_route_still_lets_the_gateway_steps_run(svc: Service) -> None:
    probes = FakeProbes({"address-route": Outcome(False, "no default route", "no-route"),
                         "tcp-target": Outcome(False, "unreachable", "unreachable")})
    steps = run(svc, probes, ("198.51.100.1", 80))
    assert {n for n, s in steps.items() if s.ok is False} == {"address-route", "tcp-target"}
    assert "hnsctl restore" in steps["address-route"].hint
    report = Report("v", tuple(steps.values()))
    assert report.summary().startswith("breaks at address-route: no default route; "
                                       "tcp-target fails because of it")


def test_a_missing_address_skips_what_needs_it(svc: Service) -> None:
    probes = FakeProbes({"address-route": Outcome(False, "eth0 has none", "no-address")})
    steps = run(svc, probes, ("198.51.100.1", 80))
    assert [n for n, s in steps.items() if s.ok is None] == [
        "arp-gateway", "icmp-gateway", "dns-gateway", "tcp-target", "path-mtu"]
    assert steps["path-mtu"].detail.startswith("not run: address-route failed")


def test_no_arp_answer_skips_the_gateway_steps_not_the_target(svc: Service) -> None:
    probes = FakeProbes({"arp-gateway": Outcome(False, "no answer", "no-answer")})
    steps = run(svc, probes, ("198.51.100.1", 80))
    assert [n for n, s in steps.items() if s.ok is None] == [
        "icmp-gateway", "dns-gateway", "path-mtu"]
    assert steps["tcp-target"].ok and "df" not in probes.calls
    assert "link show master" in steps["arp-gateway"].hint


def test_dns_is_skipped_when_the_network_has_no_proxy(tmp_path: Path) -> None:
    with Service(tmp_path / "s", nft=FakeNft(), kernel=FakeKernel()) as svc:
        svc.create_network("n", "nat", subnet="10.50.0.0/24", dns_proxy=False)
        svc.create_vm("v", "n")
        probes = FakeProbes()
        steps = run(svc, probes)
    assert steps["dns-gateway"].ok is None and "dns-gateway" not in probes.calls
    assert "DNS proxy off" in steps["dns-gateway"].detail


def test_a_probe_that_raises_fails_its_step_and_the_run_goes_on(svc: Service) -> None:
    probes = FakeProbes({"host-nat": OSError(2, "No such file or directory", "nft")})
    steps = run(svc, probes)
    assert steps["host-nat"].ok is False and "the probe failed" in steps["host-nat"].detail
    assert steps["daemon"].ok


def test_a_lowered_bridge_mtu_fails_the_path_mtu_with_the_command_to_fix_it(
        svc: Service) -> None:
    net = svc.get_network("n")
    probes = FakeProbes(limit=1400, mtus={net.bridge: 1400})
    steps = run(svc, probes)
    got = steps["path-mtu"]
    assert got.ok is False and probes.calls.count("df") == 2
    assert "largest that came back whole: 1400 bytes" in got.detail
    assert f"bridge {net.bridge} MTU 1400" in got.detail
    assert got.hint.startswith(f"ip link set {net.bridge} mtu 1500")


def test_unknown_vm_and_bad_target_fail_before_any_probe(svc: Service) -> None:
    made: list[FakeProbes] = []

    def factory(*args: Any) -> FakeProbes:
        made.append(FakeProbes())
        return made[-1]

    with pytest.raises(NotFound):
        diagnose(svc, "nope", probes=factory)
    with pytest.raises(InvalidRequest):
        diagnose(svc, "v", ("198.51.100.1", 0), probes=factory)
    with pytest.raises(InvalidRequest):
        diagnose(svc, "v", ("not-an-address", 80), probes=factory)
    with pytest.raises(InvalidRequest):
        diagnose(svc, "v", ("198.51.100.1", "80"), probes=factory)  # type: ignore[arg-type]
    assert made == []


# the command


def test_diag_cmd_refuses_a_bad_target_before_touching_the_service() -> None:
    args = argparse.Namespace(vm="v", target="198.51.100.1:70000", json=False)
    with pytest.raises(InvalidRequest) as exc:
        diag.diag_cmd(object(), args)
    assert exc.value.exit_code == 2


@pytest.mark.parametrize("as_json", [False, True])
def test_diag_cmd_exits_1_when_a_step_fails(svc: Service, as_json: bool,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    outcome = Outcome(False, "no daemon listens", "no-daemon")
    monkeypatch.setattr(diag, "_kernel_probes", lambda *a: FakeProbes({"daemon": outcome}))
    args = argparse.Namespace(vm="v", target="198.51.100.1:80", json=as_json)
    assert diag.diag_cmd(svc, args) == 1
    out = capsys.readouterr().out
    if as_json:
        data = json.loads(out)
        assert data["BreaksAt"] == "daemon"
        assert [s["Result"] for s in data["Steps"]] == ["pass"] * 8 + ["fail"]
    else:
        assert out.splitlines()[-1] == "breaks at daemon: no daemon listens"
    monkeypatch.setattr(diag, "_kernel_probes", lambda *a: FakeProbes())
    assert diag.diag_cmd(svc, args) == 0


def test_every_hint_formats_with_the_vms_names(svc: Service) -> None:
    vm, net = svc.get_vm("v"), svc.get_network("n")
    for host_netns, mirrored in ((None, False), ("hostns", True)):
        ctx = diag.HintContext.of(host_netns, vm, net, ("198.51.100.1", 80))
        ctx = dataclasses.replace(ctx, mirrored=mirrored)
        for step_name, cause in diag.HINTS:
            text = diag.hint_for(step_name, cause, ctx)
            assert step_name in STEPS and "{" not in text and "}" not in text
        assert diag.hint_for("arp-gateway", "off-bridge", ctx).startswith(
            f"{'ip -n hostns' if host_netns else 'ip'} link set {vm.host_ifname} master "
            f"{net.bridge}")
    assert diag.hint_for("daemon", "no-such-cause", ctx) == "hnsctl restore, then hnsctl " \
        "diag v again"
