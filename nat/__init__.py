"""nftables for hns: typed ruleset objects (:mod:`nat.ruleset`, :mod:`nat.mirror`),
changes as a :class:`Transaction` rendered once to one ``nft -f -`` script (pure), the
one module that runs ``nft`` (:mod:`nat.nft`), and :class:`FakeNft`, an in-memory
ruleset for unit tests (:mod:`nat.fake`).
"""

from nat.fake import FakeNft
from nat.nft import Nft, NftRunner
from nat.ruleset import (
    Chain,
    Element,
    Map,
    Set,
    Table,
    masquerade_rule,
    nat_table,
)
from nat.transaction import Transaction

__all__ = [
    "Chain",
    "Element",
    "FakeNft",
    "Map",
    "Nft",
    "NftRunner",
    "Set",
    "Table",
    "Transaction",
    "masquerade_rule",
    "nat_table",
]
