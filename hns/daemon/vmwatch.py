"""One watched VM namespace: its socket tracker and its dialer, opened and reopened.

Shared by localhost forwarding (:mod:`hns.daemon.forwarder`) and mirrored networks
(:mod:`hns.daemon.mirror`), both on the engine thread.  A namespace that cannot be opened
(not made yet, gone) is tried again every ``full_interval``, when an open one is also
checked for having been replaced under the same name (``restore`` after a reboot), by
inode.  The first failure of each kind is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from hns.errors import HnsError
from hns.model import Vm
from hns.netns import NAMESPACES
from portproxy.tracker import VmTracker
from portproxy.vmdial import DEFAULT_POOL_SIZE, VmDialer

__all__ = ["VmWatch"]

log = logging.getLogger("hns.daemon")


class VmWatch:
    """The tracker and dialer of one VM; :meth:`poll` says when its sockets may have
    changed (then ``ready`` says whether ``tracker.sockets`` is to be believed)."""

    def __init__(self, vm: Vm, call_soon_threadsafe: Callable[[Callable[[], object]], None],
                 *, full_interval: float, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        self.vm = vm
        self.full_interval = full_interval
        self.pool_size = pool_size
        self._soon = call_soon_threadsafe
        self.tracker = VmTracker(vm.netns, NAMESPACES, full_interval=full_interval)
        self.dialer = VmDialer(vm.netns, call_soon_threadsafe, NAMESPACES, pool_size)
        self.ready = False
        self.error: str | None = None
        self.next_check = 0.0

    def open(self, now: float) -> bool:
        """Start tracking the namespace; False (and tried again later) if it cannot."""
        self.next_check = now + self.full_interval
        try:
            self.tracker.open()
            self.tracker.poll(now)
        except (OSError, HnsError) as exc:
            self.tracker.close()
            self._failed(str(exc))
            return False
        self.ready, self.error = True, None
        log.debug("vm %s: watching %s", self.vm.name, self.vm.netns)
        return True

    def reset(self, reason: str) -> None:
        """Forget what the VM had; it is opened again at its next check."""
        self.close()
        self.tracker = VmTracker(self.vm.netns, NAMESPACES, full_interval=self.full_interval)
        self.dialer = VmDialer(self.vm.netns, self._soon, NAMESPACES, self.pool_size)
        self.ready = False
        self._failed(reason)

    def poll(self, now: float) -> bool:
        """Poll the tracker (and open or check the namespace when due); True when the
        VM's sockets may have changed, ``ready`` or not."""
        if now >= self.next_check:
            if not self.ready:
                return self.open(now)
            self.next_check = now + self.full_interval
            if self.tracker.replaced():
                self.reset(f"namespace {self.vm.netns} is gone or was replaced")
                return True
        if not self.ready:
            return False
        try:
            return self.tracker.poll(now)
        except OSError as exc:
            self.reset(str(exc))
            return True

    def close(self) -> None:
        self.tracker.close()
        self.dialer.close()

    def _failed(self, reason: str) -> None:
        if self.error != reason:
            log.warning("vm %s: cannot watch its sockets: %s (retrying)", self.vm.name, reason)
        self.error = reason
