"""The one table printer of the command line: columns padded to the widest cell."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["print_table"]


def print_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> None:
    """``header`` and ``rows`` on stdout, two spaces between columns, no trailing blanks."""
    lines = [[str(v) for v in row] for row in [header, *rows]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
