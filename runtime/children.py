"""Killing the processes kiln started, wherever the threads that started them are.

A Ctrl-C of a build stops its RUN containers and its COPY helpers at once, instead of
waiting for them. kiln is a child subreaper (``runtime.process``), so a container's PID 1
is kiln's own child once the container's first stage has exited: killing kiln's new
children again until the build's threads are done reaches every one of them.
"""

from __future__ import annotations

import os
import time


def now() -> float:
    """The clock of ``kill_children(started_since=)``: seconds since boot."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def kill_children(started_since: float) -> None:
    """SIGKILL every child process of this one started since ``now()`` said
    ``started_since`` (their waiters reap them). Older children, which a program using kiln
    as a library may have started itself, are left alone."""
    import signal

    me = b"%d" % os.getpid()
    tick = os.sysconf("SC_CLK_TCK")
    since = int(started_since * tick) - 1  # the kernel counts start times in whole ticks
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ... starttime(22nd) ...": comm may hold spaces and parentheses
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 19 and fields[1] == me and int(fields[19]) >= since:
            try:
                os.kill(int(name), signal.SIGKILL)
            except ProcessLookupError:
                pass
