"""The records of :class:`hns.daemon.mirror.Mirror`: a watched VM and one listener."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from hns.daemon.binding import Bound
from hns.daemon.forward_plan import ForwardKey
from hns.daemon.mirror_plan import Claim
from hns.daemon.vmwatch import VmWatch
from hns.model import Network, Vm
from portproxy.engine import Relay

__all__ = ["Listener", "Watch", "listen_error"]


@dataclass
class Watch:
    """A watched VM of a mirrored network, with what its sockets claim."""

    w: VmWatch
    net: Network
    claims: dict[ForwardKey, Claim] = field(default_factory=dict)
    draining: dict[ForwardKey, Claim] = field(default_factory=dict)

    @property
    def vm(self) -> Vm:
        return self.w.vm


@dataclass
class Listener(Bound):
    """One listener of the component: host loopback -> VM, or VM loopback -> host."""

    vm: str
    key: ForwardKey
    to_host: bool
    target: str
    relay: Relay | None = None
    inode: int = 0

    @property
    def name(self) -> str:
        where = "to host" if self.to_host else "to vm"
        return f"mirrored {self.vm} {where} {self.key.protocol} {self.key.endpoint()}"


def listen_error(exc: OSError) -> str:
    return "port in use" if exc.errno == errno.EADDRINUSE else str(exc)
