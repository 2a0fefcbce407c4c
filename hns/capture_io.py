"""Frames off an interface of the host namespace: the listen socket, the read loop, the
pcap file, and :class:`Recorder` (a capture on a thread of its own).

Theory of operation: a packet socket binds to an interface of the namespace it is
created in and stays there, so it is made on a short-lived thread inside the host
namespace (:func:`hns.netns.run_in_netns`) and read from any thread afterwards; the
caller's thread never changes namespace.  The BPF filter is attached and promiscuous
mode set before the socket's queue is emptied, so from the moment :func:`open_listener`
returns every matching frame is kept and no other.

One loop, :class:`Pump`, serves the command line and :class:`Recorder`: it waits on the
socket and on a wake pipe (:class:`Waker`), hands every frame on as bytes (a pcap record
needs no dissection), and stops at a packet count, a deadline, or a byte on the wake
pipe -- written by a signal handler or by :meth:`Recorder.stop` -- after reading what
the kernel had already queued.  Frames are cut at :data:`SNAPLEN` bytes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from scapy.arch.linux import L2ListenSocket, attach_filter, set_promisc
from scapy.data import DLT_EN10MB, MTU
from scapy.error import Scapy_Exception
from scapy.interfaces import InterfaceProvider, NetworkInterface
from scapy.layers import l2 as _l2  # noqa: F401  (binds Ethernet to ARPHRD_ETHER)
from scapy.utils import PcapWriter

from hns.capture_format import Totals
from hns.errors import HnsError, KernelError
from hns.netns import run_in_netns

__all__ = ["SNAPLEN", "PcapSink", "Pump", "Recorder", "Waker", "open_listener"]

SNAPLEN = MTU                  # scapy's read size and the compiled filter's cut: 65535
ARPHRD_ETHER = 1
RCVBUF = 4 << 20               # room for bursts while a line is printed or a record written
SOL_PACKET = 263
SO_RCVBUFFORCE = 33
PACKET_STATISTICS = 6
BATCH = 64                     # frames read per wake-up before checking the clock again
DRAIN_MAX = 100_000            # frames read at most after a stop request
TICK = 0.25                    # longest wait without calling the tick callback

Frame = Callable[[bytes, float], None]


def _open_here(ifname: str, bpf: str | None) -> Any:
    """The listen socket, made in the calling thread's namespace."""
    try:
        index = socket.if_nametoindex(ifname)
    except OSError:
        raise KernelError(f"interface {ifname} does not exist in the host namespace",
                          errno.ENODEV) from None
    iface = NetworkInterface(InterfaceProvider(), {"name": ifname, "network_name": ifname,
                                    "index": index, "type": ARPHRD_ETHER})
    try:
        sock = L2ListenSocket(iface=iface, promisc=False, nofilter=1)
    except OSError as exc:
        raise KernelError(f"cannot listen on {ifname}: {exc.strerror}", exc.errno) from None
    try:
        if bpf:
            attach_filter(sock.ins, bpf, iface)
        set_promisc(sock.ins, iface, 1)
        with contextlib.suppress(OSError):   # SO_RCVBUFFORCE needs CAP_NET_ADMIN
            sock.ins.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        sock.ins.setblocking(False)
        _discard_queued(sock.ins)
        _kernel_drops(sock.ins)              # reading the counters resets them
    except (OSError, Scapy_Exception) as exc:
        sock.close()
        raise KernelError(f"cannot listen on {ifname}: {exc}") from None
    return sock


def _discard_queued(ins: socket.socket) -> None:
    """Empty the queue of what arrived before the filter was attached."""
    while True:
        try:
            ins.recv(SNAPLEN)
        except (BlockingIOError, InterruptedError):
            return


def _kernel_drops(ins: socket.socket) -> int:
    """Frames the kernel dropped since the last call (``PACKET_STATISTICS``)."""
    try:
        raw = ins.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
    except OSError:
        return 0
    return int(struct.unpack("II", raw)[1])


def open_listener(host_netns: str | None, ifname: str, bpf: str | None) -> Any:
    """A scapy L2 listen socket on ``ifname`` of ``host_netns`` (None: this namespace),
    ``bpf`` attached, promiscuous, non-blocking, its queue empty."""
    return run_in_netns(host_netns, _open_here, ifname, bpf)


class Waker:
    """A pipe whose read end a :class:`Pump` watches; :meth:`wake` is safe to call from
    a signal handler or another thread, any number of times."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.woken = False

    def fileno(self) -> int:
        return self._r

    def wake(self) -> None:
        self.woken = True
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._w, b"!")

    def close(self) -> None:
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


class Pump:
    """Reads frames from a listen socket and hands each to ``on_frame(frame, ts)``
    until ``count`` frames, ``duration`` seconds or a wake-up.

    ``sock`` is what scapy's sockets are: ``ins`` (a non-blocking socket) and
    ``recv_raw(size) -> (cls, frame, ts)``.
    """

    def __init__(self, sock: Any, on_frame: Frame, count: int | None = None,
                 duration: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sock = sock
        self.on_frame = on_frame
        self.count = count
        self.duration = duration
        self.clock = clock
        self.packets = 0
        self.nbytes = 0
        self.dropped = 0
        self._started: float | None = None
        self._ended: float | None = None

    def totals(self) -> Totals:
        start = self._started if self._started is not None else self.clock()
        end = self._ended if self._ended is not None else self.clock()
        return Totals(self.packets, self.nbytes, max(0.0, end - start), self.dropped)

    def _full(self) -> bool:
        return self.count is not None and self.packets >= self.count

    def _read(self, limit: int) -> None:
        """Up to ``limit`` queued frames (fewer at the count or an empty queue)."""
        for _ in range(limit):
            if self._full():
                return
            try:
                _cls, frame, ts = self.sock.recv_raw(SNAPLEN)
            except (BlockingIOError, InterruptedError):
                return
            if frame is None:
                continue
            self.packets += 1
            self.nbytes += len(frame)
            self.on_frame(frame, ts if ts is not None else time.time())

    def run(self, wake: Waker, tick: Callable[[], None] | None = None) -> str:
        """Capture until done; why it stopped: ``count reached``, ``time up``,
        ``stopped``."""
        self._started = self.clock()
        deadline = None if self.duration is None else self._started + self.duration
        try:
            return self._loop(wake, deadline, tick)
        finally:
            self._ended = self.clock()
            self.dropped += _kernel_drops(self.sock.ins)

    def _loop(self, wake: Waker, deadline: float | None,
              tick: Callable[[], None] | None) -> str:
        fds = [self.sock.ins, wake.fileno()]
        while True:
            if self._full():
                return "count reached"
            now = self.clock()
            if deadline is not None and now >= deadline:
                return "time up"
            timeout = TICK if deadline is None else min(TICK, deadline - now)
            ready, _, _ = select.select(fds, [], [], timeout)
            if wake.woken or wake.fileno() in ready:
                self._read(DRAIN_MAX)
                return "count reached" if self._full() else "stopped"
            if ready:
                self._read(BATCH)
            if tick is not None:
                tick()


class PcapSink:
    """A pcap file (Ethernet, microseconds) that ``tcpdump -r`` and Wireshark read; the
    header is written at once and every record flushed, so a capture that is cut short
    leaves a file that reads up to its last frame."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._writer = PcapWriter(path, linktype=DLT_EN10MB, snaplen=SNAPLEN, sync=False)
        self._writer.write_header(None)
        self._writer.flush()

    def frame(self, frame: bytes, ts: float) -> None:
        sec = int(ts)
        usec = round((ts - sec) * 1_000_000)
        if usec >= 1_000_000:
            sec, usec = sec + 1, usec - 1_000_000
        self._writer.write_packet(frame, sec=sec, usec=usec)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class Recorder:
    """A capture into a pcap file on a thread of its own, for tests: :meth:`start`
    returns once the socket listens, :meth:`stop` returns the frames written."""

    def __init__(self, host_netns: str | None, ifname: str, path: str,
                 bpf: str | None = None) -> None:
        self.host_netns = host_netns
        self.ifname = ifname
        self.path = path
        self.bpf = bpf
        self._pump: Pump | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closers: list[Callable[[], None]] = []

    @property
    def packets(self) -> int:
        """Frames written so far."""
        return self._pump.packets if self._pump else 0

    def start(self) -> Recorder:
        """Listen (the filter checked first), create the file, start the thread."""
        from hns.capture import check_filter, check_output
        if self._pump is not None:
            raise HnsError(f"the recorder on {self.ifname} was started already")
        bpf = check_filter(self.bpf)
        check_output(self.path)
        with contextlib.ExitStack() as undo:
            sock = open_listener(self.host_netns, self.ifname, bpf)
            undo.callback(sock.close)
            sink = PcapSink(self.path)
            undo.callback(sink.close)
            waker = Waker()
            undo.callback(waker.close)
            self._closers = [sock.close, sink.close, waker.close]
            self._pump = Pump(sock, sink.frame)
            self._thread = threading.Thread(target=self._run, args=(waker,), daemon=True,
                                            name=f"capture-{self.ifname}")
            self._thread.start()
            self._waker = waker
            undo.pop_all()
        return self

    def _run(self, waker: Waker) -> None:
        assert self._pump is not None
        try:
            self._pump.run(waker)
        except BaseException as exc:  # reported by stop()
            self._error = exc

    def stop(self) -> int:
        """Stop (reading what was queued first), close the file; the frames written.
        Safe to call again, or without :meth:`start`."""
        if self._thread is not None:
            self._waker.wake()
            self._thread.join()
            self._thread = None
            for close in self._closers:
                close()
            self._closers = []
            if self._error is not None:
                raise KernelError(f"capture on {self.ifname} failed: {self._error}")
        return self.packets

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
