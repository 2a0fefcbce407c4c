"""Whether a table as nft lists it still has what its model says (pure).

``nft list table`` prints a table in block form: one ``chain NAME {`` block per chain,
its header (``type … hook … priority …; policy …;``) and then one line per rule, which
nft prints normalised (so rules are counted, not compared).  A chain that is missing or
has fewer rule lines than the model has drifted: flushed (``nft flush table``,
``nft flush chain``) or edited behind the owner's back.  A rule nft prints on more lines
than one only makes the count larger, so it is never taken for drift.
"""

from __future__ import annotations

from nat.ruleset import Table

__all__ = ["chain_rule_counts", "drifted_chains"]

_HEADER_WORDS = ("type ", "policy ", "comment ", "devices ", "flags ")


def chain_rule_counts(listing: str) -> dict[str, int]:
    """Chain name -> the number of rule lines in ``listing`` (``nft list table`` text)."""
    counts: dict[str, int] = {}
    chain: str | None = None
    depth = 0
    for raw in listing.splitlines():
        line = raw.split(" # handle", 1)[0].strip()
        if chain is None:
            if line.startswith("chain ") and line.endswith("{"):
                chain, depth = line[len("chain "):-1].strip(), 1
                counts[chain] = 0
            continue
        depth += line.count("{") - line.count("}")
        if depth <= 0:
            chain = None
        elif line and depth == 1 and not line.startswith(_HEADER_WORDS):
            counts[chain] += 1
        elif line and depth > 1 and line.count("{") > line.count("}"):
            counts[chain] += 1          # a rule whose set opens here and wraps
    return counts


def drifted_chains(table: Table, listing: str) -> list[str]:
    """The chains of ``table`` that ``listing`` lacks or holds fewer rules of."""
    counts = chain_rule_counts(listing)
    return [c.name for c in table.chains if counts.get(c.name, -1) < len(c.rules)]
