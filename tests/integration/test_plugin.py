"""The pytest plugin as a user meets it: a test file of theirs, run by a pytest of its own."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hns.testing import remove_stale_sandboxes

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "test_example.py"


def run_pytest(directory: Path, *args: str,
               prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "-q", *args], cwd=directory, capture_output=True, text=True,
                          timeout=300, check=False)


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    shutil.copy(EXAMPLE, tmp_path / "test_example.py")
    return tmp_path


def test_example_runs_twice_and_in_parallel_leaving_nothing(user_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for args in ((), (), ("-n", "2")):
        result = run_pytest(user_dir, *args)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "2 passed" in result.stdout
        # the plugin's own session check fails a run that leaves anything behind (other
        # tests of this suite make namespaces meanwhile, so no global before/after here)
        assert "left behind" not in result.stdout


def test_session_fails_naming_what_a_test_left_behind(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    (tmp_path / "test_leak.py").write_text(
        "from hns.testing.sandbox import Sandbox\n\n"
        "def test_leaks():\n"
        "    Sandbox(tag='leak01')  # never closed\n")
    result = run_pytest(tmp_path)
    assert result.returncode == 1
    assert "left behind" in result.stdout
    assert "hnst-leak01-host" in result.stdout
    assert not any(name.startswith("hnst-leak01-") for name in netns_names())  # atexit


def test_fixtures_skip_where_nftables_is_missing(user_dir: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # a PATH with ip and nsenter but no nft
    bin_dir.mkdir()
    for tool in ("ip", "nsenter"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    env = dict(os.environ, PATH=str(bin_dir))
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                             "-rs"], cwd=user_dir, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 skipped" in result.stdout
    assert "'nft' command" in result.stdout


def run_isolated(directory: Path, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A run with ``--hns-prefix`` and an owner-record directory of its own."""
    env = dict(os.environ, HNS_SANDBOX_RECORDS=str(directory / "records"))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                           f"--hns-prefix={prefix}", *args], cwd=directory, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture
def prefix(tmp_path: Path) -> Iterator[str]:
    """A prefix of this test's own; what runs with it left is removed, then must be gone."""
    name = f"t{secrets.token_hex(3)}-"
    try:
        yield name
    finally:
        remove_stale_sandboxes(prefix=name, directory=str(tmp_path / "records"))
        assert not [ns for ns in netns_names() if ns.startswith(name)]


def test_prefix_names_the_runs_namespaces(tmp_path: Path, prefix: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    (tmp_path / "test_names.py").write_text(
        "import json\n\n"
        "def test_names(hns_sandbox, nat_vm):\n"
        "    with open('names.json', 'w') as f:\n"
        "        json.dump([hns_sandbox.host_netns, hns_sandbox.outside_netns,\n"
        "                   hns_sandbox.state_dir], f)\n")
    result = run_isolated(tmp_path, prefix)
    assert result.returncode == 0, result.stdout + result.stderr
    host, outside, state_dir = json.loads((tmp_path / "names.json").read_text())
    assert host.startswith(prefix) and host.endswith("-host")
    assert outside == host[:-len("host")] + "out"
    assert os.path.basename(state_dir).startswith(f"hns-sandbox-{prefix}")
    assert host not in netns_names() and not os.path.exists(state_dir)


@pytest.mark.parametrize("bad", ["a/b", "-x", "x" * 25])
def test_a_bad_prefix_is_a_usage_error(tmp_path: Path, bad: str) -> None:
    (tmp_path / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    result = run_isolated(tmp_path, bad)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "--hns-prefix: invalid sandbox prefix" in result.stderr


def test_session_sandbox_is_shared_then_removed(tmp_path: Path, prefix: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    (tmp_path / "test_session.py").write_text(
        "import json\n\n"
        "def test_first(hns_session_sandbox):\n"
        "    hns_session_sandbox.service.create_network('nat', 'nat')\n"
        "    vm = hns_session_sandbox.vm('shared', 'nat')\n"
        "    assert vm.run(['ping', '-c1', '-W5', vm.gateway]).returncode == 0\n\n"
        "def test_second(hns_session_sandbox, hns_sandbox):\n"
        "    assert [v.name for v in hns_session_sandbox.service.list_vms()] == ['shared']\n"
        "    assert hns_sandbox.host_netns != hns_session_sandbox.host_netns\n"
        "    with open('names.json', 'w') as f:\n"
        "        json.dump([hns_session_sandbox.host_netns,\n"
        "                   hns_session_sandbox.vms[0].netns], f)\n")
    result = run_isolated(tmp_path, prefix)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout and "left behind" not in result.stdout
    host, vm = json.loads((tmp_path / "names.json").read_text())
    assert host.startswith(prefix)
    assert host not in netns_names() and vm not in netns_names()
