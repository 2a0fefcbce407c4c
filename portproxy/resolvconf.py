"""resolv.conf, read: the one parser of hns (the DNS proxy's upstreams, the VMs' files,
the host's nameservers as taken prefixes)."""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["entries", "nameservers"]


def entries(text: str) -> Iterator[tuple[str, list[str]]]:
    """(keyword, arguments) of each line that has any, comments (``#``, ``;``) left out."""
    for line in text.splitlines():
        words = line.split()
        if words and not words[0].startswith(("#", ";")):
            yield words[0], words[1:]


def nameservers(text: str) -> list[str]:
    """The ``nameserver`` addresses, in order, as written."""
    return [args[0] for keyword, args in entries(text) if keyword == "nameserver" and args]
