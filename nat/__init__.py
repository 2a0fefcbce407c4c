"""nftables for hns: a small ruleset model rendered to nft text (pure), and the one
module that runs ``nft`` (:mod:`nat.nft`), applying whole transactions with ``nft -f -``.
"""

from nat.nft import FakeNft, Nft, NftRunner
from nat.ruleset import Chain, Table, masquerade_rule, nat_table, render_delete, render_replace

__all__ = [
    "Chain",
    "FakeNft",
    "Nft",
    "NftRunner",
    "Table",
    "masquerade_rule",
    "nat_table",
    "render_delete",
    "render_replace",
]
