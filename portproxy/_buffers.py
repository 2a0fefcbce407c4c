"""The buffer of one half of a TCP relay: a pipe for ``splice(2)``, or a bytearray.

Theory of operation: a :class:`Way` moves bytes from a source fd into its buffer
(:meth:`Way.fill`) and from the buffer to a sink fd (:meth:`Way.drain`).  By default the
buffer is a pipe and both moves are ``splice(2)``: the bytes never enter user space.
When a kernel refuses splice for an fd (EINVAL), the relay calls :meth:`Way.to_copy`,
which moves what the pipe holds into a bytearray; from then on the way copies with
``readv``/``write``.  Both moves are non-blocking and raise ``BlockingIOError`` when the
fd (or the pipe) has no data or no room.

Pipes come from a :class:`PipePool` and go back to it whenever they are empty, so an idle
connection holds no pipe and a busy one reuses the same pipe without a system call.  A
pipe is sized with ``F_SETPIPE_SZ`` once, when made; its capacity counts pages, not
bytes, so a pipe may be full before it holds ``size`` bytes (the relay allows for it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os

__all__ = ["DEFAULT_BUFFER_SIZE", "DEFAULT_PIPE_SIZE", "PipePool", "Way"]

DEFAULT_PIPE_SIZE = 1 << 20        # bytes per pipe (the kernel's default pipe-max-size)
DEFAULT_BUFFER_SIZE = 256 << 10    # bytes per copy buffer, when splice is refused
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_splice = os.splice

Pipe = tuple[int, int]


class PipePool:
    """Empty pipes to reuse: ``get`` one, ``put`` it back when empty."""

    def __init__(self, size: int = DEFAULT_PIPE_SIZE, keep: int = 64) -> None:
        if size < 4096:
            raise ValueError(f"pipe size must be at least 4096, not {size}")
        self.size = size
        self.keep = keep
        self.made = 0
        self.min_slots = size // 4096   # fewest page slots of any pipe made (see Way.drained)
        self._free: list[Pipe] = []

    def get(self) -> Pipe:
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self.size)
        except OSError:     # EPERM beyond fs.pipe-user-pages-soft: a smaller pipe serves
            self.min_slots = min(self.min_slots, fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) // 4096)
        self.made += 1
        return r, w

    def put(self, pipe: Pipe) -> None:
        """Take back an *empty* pipe."""
        if len(self._free) < self.keep:
            self._free.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: Pipe) -> None:
        for fd in pipe:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        while self._free:
            self.discard(self._free.pop())


class Way:
    """The buffer of one half; see the module docstring."""

    __slots__ = ("_buf", "_head", "_pool", "_r", "_tail", "_view", "_w", "buffer_size",
                 "copying")

    def __init__(self, pool: PipePool, buffer_size: int = DEFAULT_BUFFER_SIZE,
                 splice: bool = True) -> None:
        self._pool = pool
        self._r = -1
        self._w = -1
        self.buffer_size = buffer_size
        self.copying = not splice
        self._buf: bytearray | None = None
        self._view: memoryview | None = None
        self._head = 0
        self._tail = 0

    @property
    def capacity(self) -> int:
        """How many bytes the buffer may hold."""
        if self.copying:
            return self.buffer_size
        return self._pool.size

    def fill(self, fd: int, n: int) -> int:
        """Read up to ``n`` bytes from ``fd`` into the buffer; 0 means EOF."""
        if self.copying:
            return self._recv(fd, n)
        if self._w < 0:
            self._r, self._w = self._pool.get()
        return _splice(fd, self._w, n, None, None, SPLICE_FLAGS)

    def drained(self, asked: int, got: int, pending: int) -> bool:
        """Whether a fill that asked ``asked`` bytes and got ``got`` emptied its source.

        A short read of a socket empties it, unless the pipe filled up first: every byte
        takes at most one page slot, so a pipe holding fewer bytes than it has slots is
        not full.  This spares the read that would only say EAGAIN.
        """
        return got < asked and (self.copying or pending < self._pool.min_slots)

    def drain(self, fd: int, n: int) -> int:
        """Write up to ``n`` buffered bytes to ``fd``; how many were written."""
        if self.copying:
            return self._send(fd, n)
        return _splice(self._r, fd, n, None, None, SPLICE_FLAGS)

    def move_to(self, pool: PipePool) -> None:
        """From now on, get pipes from ``pool`` and give them back to it (another loop's)."""
        self._pool = pool

    def emptied(self) -> None:
        """The buffer is empty: give its pipe back to the pool."""
        if self._r >= 0:
            self._pool.put((self._r, self._w))
            self._r = self._w = -1
        self._head = self._tail = 0

    def release(self, pending: int) -> None:
        """The connection is over; ``pending`` bytes are left in the buffer."""
        if self._r >= 0:
            if pending:
                self._pool.discard((self._r, self._w))
            else:
                self._pool.put((self._r, self._w))
            self._r = self._w = -1
        self._buf = self._view = None

    def to_copy(self, pending: int) -> None:
        """Stop splicing: move the ``pending`` bytes of the pipe into a bytearray."""
        self.copying = True
        self.buffer_size = max(self.buffer_size, pending)
        self._ensure_buffer()
        if self._r >= 0:
            assert self._view is not None
            while self._tail < pending:
                self._tail += os.readv(self._r, [self._view[self._tail:pending]])
            self._pool.put((self._r, self._w))
            self._r = self._w = -1

    def _ensure_buffer(self) -> memoryview:
        if self._view is None or len(self._view) < self.buffer_size:
            self._buf = bytearray(self.buffer_size)
            self._view = memoryview(self._buf)
        return self._view

    def _recv(self, fd: int, n: int) -> int:
        view = self._ensure_buffer()
        if self._tail + n > len(view):          # compact: keep the pending bytes in front
            pending = self._tail - self._head
            view[:pending] = view[self._head:self._tail]
            self._head, self._tail = 0, pending
        got = os.readv(fd, [view[self._tail:self._tail + n]])
        self._tail += got
        return got

    def _send(self, fd: int, n: int) -> int:
        assert self._view is not None
        sent = os.write(fd, self._view[self._head:self._head + n])
        self._head += sent
        return sent
