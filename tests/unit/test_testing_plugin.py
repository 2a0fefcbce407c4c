"""The plugin's requirement check, without root."""

from __future__ import annotations

import pytest

from hns.testing import sandbox


def test_missing_root_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    reason = sandbox.missing_requirements()
    assert reason is not None and "root" in reason


def test_missing_tool_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("shutil.which", lambda tool: None if tool == "nft" else "/x")
    reason = sandbox.missing_requirements()
    assert reason is not None and "'nft'" in reason


def test_nothing_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("shutil.which", lambda tool: f"/usr/bin/{tool}")
    assert sandbox.missing_requirements() is None
