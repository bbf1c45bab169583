"""Where a RUN step's output goes.

One stage at a time: the container writes straight to kiln's stdout and stderr (no copy,
a progress bar's ``\\r`` and colours reach the terminal as they are). Stages that build at
the same time: each line goes out whole, prefixed with its stage (``[stage-a] hello``,
``[1] hello`` for a stage without a name), stdout to stdout and stderr to stderr, so the
stages' lines never mix within a line. ``-q``: the output is kept (its last
``TAIL_BYTES``) and shown only if the step fails, as ``docker build -q`` shows the build's
output when it fails.

A relay's pipes are read by a thread until the step's container has exited; then what is
left in them is read and the thread ends: it never waits for an end of file, which a
process that another stage forked meanwhile (holding a copy of a pipe) could delay.
"""

from __future__ import annotations

import os
import select
import signal
import threading

TAIL_BYTES = 64 << 10
_MAX_LINE = 64 << 10  # a longer line without a newline goes out in pieces of this size
# as the build's commit threads: signals reach the thread that forwards them to containers
_BLOCKED = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
            signal.SIGUSR2]


def write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


class RunOutput:
    """The container's stdout and stderr for one RUN step (``stdout``/``stderr``: fds to give
    the container), relayed by a thread until ``close()``."""

    def __init__(self, *, prefix: bytes | None, lock: threading.Lock):
        self.prefix = prefix  # None: keep a tail (-q), else prefix each line
        self.lock = lock  # held for each write to kiln's stdout/stderr
        self.tail = bytearray()
        self._partial: dict[int, bytearray] = {}
        self._targets: dict[int, int] = {}  # read end -> kiln's fd (1 or 2)
        self._write_ends: list[int] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        if prefix is None:
            r, w = os.pipe2(os.O_CLOEXEC)  # one pipe: the tail keeps the two streams' order
            self._targets[r] = 2
            self._write_ends.append(w)
            self.stdout = self.stderr = w
        else:
            for target in (1, 2):
                r, w = os.pipe2(os.O_CLOEXEC)
                self._targets[r] = target
                self._write_ends.append(w)
            self.stdout, self.stderr = self._write_ends
        for r in self._targets:
            self._partial[r] = bytearray()
        self._thread = threading.Thread(target=self._pump, name="kiln-run-output",
                                        daemon=True)
        self._thread.start()

    def started(self) -> None:
        """The container has its copies of the write ends: kiln's go."""
        for w in self._write_ends:
            os.close(w)
        self._write_ends = []

    def close(self) -> None:
        """After the container has exited: what it wrote goes out, then the thread ends."""
        self.started()
        os.write(self._wake_w, b"x")
        self._thread.join()
        for fd in (*self._targets, self._wake_r, self._wake_w):
            os.close(fd)
        self._targets = {}

    def _pump(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)
        poller = select.poll()
        for r in self._targets:
            poller.register(r, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        live = set(self._targets)
        while live:
            stopping = False
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    stopping = True
                elif not self._read(fd):
                    poller.unregister(fd)
                    live.discard(fd)
            if stopping:
                for fd in live:
                    os.set_blocking(fd, False)
                    while self._read(fd, nonblocking=True):
                        pass
                break
        for fd, rest in self._partial.items():
            if rest:
                self._emit(fd, bytes(rest) + b"\n")
                rest.clear()

    def _read(self, fd: int, *, nonblocking: bool = False) -> bool:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return False
        if not data:
            return False
        if self.prefix is None:
            self.tail += data
            if len(self.tail) > TAIL_BYTES:
                del self.tail[:len(self.tail) - TAIL_BYTES]
            return True
        buf = self._partial[fd]
        buf += data
        end = buf.rfind(b"\n")
        if end >= 0:
            self._emit(fd, bytes(buf[:end + 1]))
            del buf[:end + 1]
        while len(buf) >= _MAX_LINE:
            self._emit(fd, bytes(buf[:_MAX_LINE]) + b"\n")
            del buf[:_MAX_LINE]
        return True

    def _emit(self, fd: int, lines: bytes) -> None:
        text = b"".join(self.prefix + line + b"\n" for line in lines[:-1].split(b"\n"))
        with self.lock:
            try:
                write_all(self._targets[fd], text)
            except OSError:
                pass  # kiln's own output is closed: the build goes on without it
