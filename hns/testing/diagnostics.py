"""What the plugin gathers about a sandbox when a test fails (``hns diagnostics``).

For each VM of the sandbox the text of :func:`hns.diag.diagnose`, the daemon's answer to
``hnsctl --json status`` when one runs (else the plain ``hnsctl status``), the tail of
the daemon's log when the test started one with ``hns_daemon``, and the host
namespace's nft ruleset.  Every part that cannot be had becomes one error line: a
diagnostic never hides the test's own failure.
"""

from __future__ import annotations

import os
from typing import Any

from hns.testing.report import Part, diagnostics_text, error_line

__all__ = ["collect"]

COMMAND_TIMEOUT = 20.0


def _vm_parts(sandbox: Any) -> list[Part]:
    try:
        svc = sandbox.service
        names = [vm.name for vm in svc.list_vms()]
    except Exception as exc:
        return [Part("VMs", error_line("listing the VMs", exc))]
    if not names:
        return [Part("VMs", "no VMs")]
    try:
        from hns.diag import diagnose
    except Exception as exc:
        return [Part(f"vm {name}", error_line("hns.diag", exc)) for name in names]
    parts = []
    for name in names:
        try:
            text = str(diagnose(svc, name).text())
        except Exception as exc:
            text = error_line(f"diagnose({name!r})", exc)
        parts.append(Part(f"vm {name}: hns.diag", text))
    return parts


def _run(sandbox: Any, title: str, argv: list[str], cli: bool) -> Part:
    try:
        if cli:
            result = sandbox.hnsctl(*argv, timeout=COMMAND_TIMEOUT)
        else:
            result = sandbox.host.run(argv, timeout=COMMAND_TIMEOUT)
    except Exception as exc:
        return Part(title, error_line(" ".join(argv), exc))
    text = result.stdout
    if result.returncode != 0:
        text += f"(exit {result.returncode}) {result.stderr.strip()}"
    return Part(title, text)


def _daemon_runs(sandbox: Any, daemon: Any) -> bool:
    if daemon is not None and daemon.running:
        return True
    try:
        from hns.daemon.spawn import serving
        return serving(sandbox.state_dir) is not None
    except Exception:
        return False


def collect(sandbox: Any, daemon: Any = None) -> str:
    """The diagnostics text of ``sandbox`` (``daemon``: its :class:`HnsDaemon`, if any)."""
    if not os.path.isdir(sandbox.state_dir):
        return diagnostics_text(sandbox.host_netns, [Part("state", "the sandbox is gone")])
    parts = _vm_parts(sandbox)
    if _daemon_runs(sandbox, daemon):
        parts.append(_run(sandbox, "hnsctl --json status", ["--json", "status"], cli=True))
    else:
        parts.append(_run(sandbox, "hnsctl status (no daemon)", ["status"], cli=True))
    if daemon is not None and daemon.proc is not None:
        parts.append(Part(f"daemon log ({daemon.log_path}, last lines)", daemon.log_tail()))
    parts.append(_run(sandbox, f"ip netns exec {sandbox.host_netns} nft list ruleset",
                      ["nft", "list", "ruleset"], cli=False))
    return diagnostics_text(sandbox.host_netns, parts)
