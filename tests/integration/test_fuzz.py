"""CLI fuzzing: random argv over every command of hnsctl, run for real in a sandbox.

A hand-written grammar of the commands, their options and a pool of values per kind
(valid ones, edge cases, other scripts' digits, empty strings, huge numbers, '-', paths,
very long names), mutated at random (a token dropped, doubled, replaced or added).  Every
run must exit 0 or 2 (or 1 with one line that names a runtime failure) and never print a
traceback; an exit 2 must change nothing (the state, links, addresses, namespaces,
/etc/netns, the nft ruleset of the sandbox's host namespace).  A fixed seed keeps the
run reproducible; ``HNS_FUZZ_SEED`` and ``HNS_FUZZ_RUNS`` ask for another or a longer one.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any

import pytest
from helpers.nsutil import full_snapshot, populate

from hns.testing import Sandbox

SEED = int(os.environ.get("HNS_FUZZ_SEED", "20240610"))
RUNS = int(os.environ.get("HNS_FUZZ_RUNS", "220"))

NAMES = ["n", "v", "v2", "n2", "m2", "wsl", "WSL", "", "-", "bad name", "x" * 32, "x" * 33,
         "a" * 5000, "\u0661", "\u00fc", "../etc", "a\nb", "-v", "n.1", "_x", "0", "\u200bn"]
NUMBERS = ["0", "1", "80", "576", "1500", "9000", "65535", "65536", "-1", "", "-", " 80",
           "\u0668\u0660", "\u0661\u0665\u0660\u0660", "²", "\uff18\uff10", "9" * 30,
           "9" * 5000, "0x50", "1e3", "8.0", "+80", "08080"]
ADDRESSES = ["10.42.0.20", "10.42.0.1", "10.42.0.10", "10.42.0.255", "10.43.0.5", "0.0.0.0",
             "127.0.0.1", "255.255.255.255", "224.0.0.1", "198.51.100.2", "::1", "::",
             "2001:db8::5", "fe80::1%eth0", "", "-", "10.42.0", "\u0661\u0660.42.0.5",
             "a" * 300]
CIDRS = ["10.50.0.0/24", "10.42.0.0/24", "10.50.0.0/33", "10.50.0.1/24", "8.8.8.0/24",
         "fd00::/64", "10.50.0.0/\u0662\u0664", "", "-", "10.50.0.0/31", "192.168.77.0/24",
         "100.64.5.0/24", "10.51.0.0/255.255.255.0"]
MACS = ["00:15:5d:00:00:99", "00:15:5d:00:00:10", "01:00:5e:00:00:01", "00:00:00:00:00:00",
        "00-15-5D-00-00-AA", "00:15-5d:00:00:01", "zz", "", "\u0660\u0660:15:5d:00:00:01"]
SWITCHES = ["on", "off", "ON", "yes", "no", "0", "1", "", "maybe", "\u0661", "\u3000on"]
PROTOCOLS = ["tcp", "udp", "6", "17", "TCP", "sctp", "", "\u0666"]
PORT_LISTS = ["22", "22,8000-8010", "", "22,", "10-5", "1-65535", "\u0668\u0660", "22, 23",
              "0", "-", "1-4097"]
TYPES = ["nat", "mirrored", "NAT", "Mirrored", "bridge", "", "\uff2e\uff21\uff34"]
KINDS = ["v4tov4", "v4tov6", "v6tov4", "v6tov6", "V4toV4", "v4tov5", "", "all"]
NETSH_KEYS = ["listenport", "listenaddress", "connectaddress", "connectport", "protocol",
              "ListenPort", "bogus", ""]
JUNK = ["--json", "--bogus", "-", "--", "-h", "", "\u0661", "x" * 300, "--force",
        "--dry-run", "extra", "--network", "--type"]

Pool = list[str]
# command words -> (positionals, {option: pool}, required options); a pool of None is a flag
GRAMMAR: dict[tuple[str, ...], tuple[list[Pool], dict[str, Pool | None], set[str]]] = {
    ("network", "create"): ([NAMES], {
        "--type": TYPES, "--subnet": CIDRS, "--gateway": ADDRESSES, "--mtu": NUMBERS,
        "--localhost-forwarding": SWITCHES, "--firewall": SWITCHES,
        "--ignored-ports": PORT_LISTS, "--host-address-loopback": SWITCHES}, {"--type"}),
    ("network", "list"): ([], {}, set()),
    ("network", "show"): ([NAMES], {}, set()),
    ("network", "delete"): ([NAMES], {"--force": None}, set()),
    ("vm", "create"): ([NAMES], {"--network": NAMES, "--ip": ADDRESSES, "--mac": MACS},
                       {"--network"}),
    ("vm", "list"): ([], {"--network": NAMES}, set()),
    ("vm", "show"): ([NAMES], {}, set()),
    ("vm", "delete"): ([NAMES], {}, set()),
    ("portmap", "add"): ([NAMES], {"--protocol": PROTOCOLS, "--external-port": NUMBERS,
                                   "--internal-port": NUMBERS, "--host-address": ADDRESSES},
                         {"--protocol", "--external-port", "--internal-port"}),
    ("portmap", "delete"): ([NAMES], {"--protocol": PROTOCOLS, "--external-port": NUMBERS,
                                      "--host-address": ADDRESSES},
                            {"--protocol", "--external-port"}),
    ("portmap", "list"): ([NAMES], {}, set()),
    ("portproxy", "show"): ([KINDS], {}, set()),
    ("up",): ([], {"--networking-mode": TYPES}, set()),
    ("down",): ([], {}, set()),
    ("restore",): ([], {}, set()),
    ("gc",): ([], {"--dry-run": None}, set()),
    ("status",): ([], {}, set()),
}
NETSH_VERBS = ["add", "set", "delete"]
RARE = [("portproxy", "reset"), ("vm", "exec"), ("daemon",)]  # only in small doses


def _netsh_word(rng: random.Random) -> str:
    key = rng.choice(NETSH_KEYS)
    pool = rng.choice([NUMBERS, ADDRESSES, PROTOCOLS])
    return f"{key}={rng.choice(pool)}" if rng.random() < 0.9 else rng.choice(JUNK)


def _command(rng: random.Random) -> list[str]:
    """A command of the grammar, with its required options most of the time."""
    roll = rng.random()
    if roll < 0.2:
        words = ["listenport=" + rng.choice(NUMBERS)] if rng.random() < 0.8 else []
        words += [_netsh_word(rng) for _ in range(rng.randint(0, 4))]
        return ["portproxy", rng.choice(NETSH_VERBS), rng.choice(KINDS), *words]
    if roll < 0.23:
        which = rng.choice(RARE)
        if which == ("vm", "exec"):
            return ["vm", "exec", rng.choice(NAMES), *rng.choice([["--", "true"], [], ["--"]])]
        if which == ("daemon",):  # never a daemon that would run: always a bad argument
            return ["daemon", rng.choice(["extra", "--bogus", "-"])]
        return list(which)
    words, (positionals, options, required) = rng.choice(list(GRAMMAR.items()))
    argv = list(words)
    argv += [rng.choice(pool) for pool in positionals if rng.random() < 0.95]
    for option, pool in options.items():
        if (option in required and rng.random() < 0.95) or rng.random() < 0.3:
            argv += [option] if pool is None else [option, rng.choice(pool)]
    return argv


def _mutate(rng: random.Random, argv: list[str]) -> list[str]:
    argv = list(argv)
    for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):
        i = rng.randrange(len(argv) + 1)
        op = rng.choice(["drop", "double", "replace", "insert"])
        if op == "insert" or not argv or i == len(argv):
            argv.insert(i, rng.choice(JUNK + NAMES + NUMBERS))
        elif op == "drop":
            del argv[i]
        elif op == "double":
            argv.insert(i, argv[i])
        else:
            argv[i] = rng.choice(JUNK + NAMES + NUMBERS + ADDRESSES)
    return argv


def _globals(rng: random.Random, sandbox: Sandbox) -> list[str]:
    """Now and then a bad global option (the later one wins over hnsctl's prefix): only
    values that can never make a state dir or reach another namespace."""
    roll = rng.random()
    if roll < 0.03:
        return ["--state-dir", rng.choice(["", "/proc/version", "/proc/version/x",
                                           sandbox.state_dir + "/" + "x" * 300])]
    if roll < 0.06:
        return ["--host-netns", rng.choice(["", "..", "a/b", "hns-fuzz-missing-netns"])]
    return ["--json"] if roll < 0.2 else []


def generate(sandbox: Sandbox, seed: int, runs: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [[*_globals(rng, sandbox), *_mutate(rng, _command(rng))] for _ in range(runs)]


def settled(take: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A snapshot that holds still (links and addresses made by a command appear in the
    kernel's own time): two equal ones in a row."""
    last = take()
    for _ in range(20):
        time.sleep(0.1)
        now = take()
        if now == last:
            return now
        last = now
    return last


def _verdict(argv: list[str], rc: int, err: str) -> str | None:
    """What is wrong with one run, or None."""
    lines = err.splitlines()
    if "Traceback" in err:
        return f"traceback: {argv!r}: {err[-600:]!r}"
    if rc == 2:
        if len(lines) != 1 or not lines[0].startswith("hnsctl: error:"):
            return f"exit 2 without one error line: {argv!r}: {err!r}"
    elif rc == 1:
        if len(lines) != 1 or not lines[0].startswith("hnsctl: error:"):
            return f"exit 1 without one error line: {argv!r}: {err!r}"
        if "unexpected error" in err:
            return f"unexpected exception: {argv!r}: {err!r}"
    elif rc != 0:
        return f"exit {rc}: {argv!r}: {err!r}"
    return None


@pytest.fixture
def sandbox(hns_sandbox: Sandbox) -> Sandbox:
    """A network n (10.42.0.0/24) with VM v, a port mapping and a port proxy."""
    return populate(hns_sandbox)


def test_random_argv_exits_0_or_2_and_a_refusal_changes_nothing(sandbox: Sandbox) -> None:
    argvs = generate(sandbox, SEED, RUNS)
    problems: list[str] = []
    codes: dict[int, int] = {}
    failures: list[str] = []
    before = full_snapshot(sandbox)
    for argv in argvs:
        result = sandbox.hnsctl(*argv)
        codes[result.returncode] = codes.get(result.returncode, 0) + 1
        verdict = _verdict(argv, result.returncode, result.stderr)
        if verdict:
            problems.append(verdict)
        if result.returncode == 1:
            failures.append(result.stderr.strip())
        after = (full_snapshot(sandbox) if result.returncode == 2
                 else settled(lambda: full_snapshot(sandbox)))
        if result.returncode == 2 and after != before:
            changed = sorted(k for k in after if after[k] != before[k])
            problems.append(f"exit 2 changed {changed}: {argv!r}: {result.stderr!r}")
        before = after
    assert problems == [], "\n".join(problems)
    assert set(codes) <= {0, 1, 2}, codes
    assert codes.get(2, 0) > RUNS // 2 and codes.get(0, 0) > RUNS // 20, codes
    assert len(failures) <= RUNS // 50, failures  # runtime failures are rare and one line
