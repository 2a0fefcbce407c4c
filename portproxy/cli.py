"""hnsctl commands of the userspace data plane: portproxy, daemon, status."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["HANDLERS", "register"]

HANDLERS: dict[str, Callable[[Any, argparse.Namespace], int]] = {}


def register(sub: Any, leaf: argparse.ArgumentParser) -> None:
    """Add this package's commands to hnsctl's subparsers."""
