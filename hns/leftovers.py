"""What ``gc`` may remove, the pure half: kernel objects of this instance the state does
not know.

Ownership is decided by this instance's full ID, never by the short tag in the names
alone: two state directories whose tags collided would otherwise remove each other's
objects.  A link carries the ID in its alias, a VM namespace on the alias of its ``lo``
(:func:`hns.kernel.tag_netns`), an ``/etc/netns`` entry in the owner line of its
``resolv.conf`` (:data:`hns.resolv.OWNER_LINE`), an nft table in its comment.  The
inventories are read by the service; these functions only choose.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["leftover_links", "leftover_netns", "leftover_resolv", "tag_in_use"]


def leftover_links(tagged: Iterable[str], known: Iterable[str]) -> list[str]:
    """Links carrying our ID (``tagged``) that the state does not know, the VMs' veths
    (``hv...``) before bridges: deleting a bridge does not delete its ports."""
    keep = frozenset(known)
    return sorted((link for link in tagged if link not in keep),
                  key=lambda name: (not name.startswith("hv"), name))


def leftover_netns(tags: Mapping[str, str | None], known: Iterable[str], prefix: str,
                   owner: str) -> list[str]:
    """Namespaces named with our tag (``prefix``) whose ``lo`` alias carries our ID
    (``owner``, an alias prefix) and that no VM row names; ``tags``: namespace -> its
    alias (None: none)."""
    keep = frozenset(known)
    return sorted(ns for ns, tag in tags.items()
                  if ns.startswith(prefix) and ns not in keep and (tag or "").startswith(owner))


def leftover_resolv(owners: Mapping[str, str | None], known: Iterable[str],
                    live_netns: Iterable[str], prefix: str, instance_id: str) -> list[str]:
    """``/etc/netns`` entries named with our tag whose resolv.conf names our ID as its
    owner, and whose namespace neither a VM row names nor exists; ``owners``: entry ->
    the owner its resolv.conf names (None: none)."""
    keep = frozenset(known) | frozenset(live_netns)
    return sorted(entry for entry, owner in owners.items()
                  if entry.startswith(prefix) and entry not in keep and owner == instance_id)


def tag_in_use(netns_prefix: str, table: str, namespaces: Iterable[str],
               etc_entries: Iterable[str], tables: Iterable[str]) -> bool:
    """Whether kernel objects of an instance tag exist: a namespace or an /etc/netns
    entry named with it (``netns_prefix``), or its nft table (``table``, "inet NAME") or
    the daemon's ones beside it (mirrored networks, the kernel data path)."""
    if any(name.startswith(netns_prefix) for name in (*namespaces, *etc_entries)):
        return True
    return any(t in (table, f"{table}-mirror", f"{table}-fast") for t in tables)
