"""nft as hns uses it: nat's runner with hns's process runner and hns's error
(:class:`~hns.errors.KernelError`), and the tables made from hns's objects."""

from __future__ import annotations

from hns import process
from hns.errors import KernelError
from hns.mirrored import MirrorSpec
from nat.mirror import vm_table
from nat.nft import Nft
from nat.transaction import Transaction

__all__ = ["apply_vm_table", "nft"]


def nft(netns: str | None = None) -> Nft:
    """nft in namespace ``netns`` (None: this process's), failing with KernelError."""
    return Nft(netns, run=process.run, error=KernelError)


def apply_vm_table(ifname: str, spec: MirrorSpec) -> None:
    """Replace the table ``hns-mirror`` of the VM ``spec`` describes (one transaction)."""
    nft(spec.netns).run(Transaction().replace_table(vm_table(
        ifname, spec.transit4.ip, spec.transit6.ip, spec.view.primary4, spec.view.primary6)))
