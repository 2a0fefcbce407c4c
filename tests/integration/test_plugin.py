"""The pytest plugin as a user meets it: a test file of theirs, run by a pytest of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
