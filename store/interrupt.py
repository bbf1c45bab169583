"""Stopping at once when kiln is told to (a Ctrl-C, a CI system's SIGTERM).

The CLI's signal handler calls ``stop``. From then on every thread that moves bytes for
kiln stops at its next chunk (``check``), a wait before a retry ends at once (``wait``),
and a thread blocked reading a socket wakes: ``stop`` runs the ``on_stop`` callbacks,
which shut the sockets kiln has open. Each thread then unwinds through its own clean-up
(temp files, staged dirs), so that kiln leaves within moments with its store's tmp/ clean.

Nothing here happens unless ``stop`` is called: a program using kiln as a library
decides for itself (it may call ``stop`` from its own signal handler). There is no way
back from a stop; it is for a process about to end.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

SIGINT, SIGTERM = 2, 15  # the numbers, without the signal module's start-up cost


class Interrupted(BaseException):
    """kiln was told to stop by signal ``signum``. Not an Exception: no ``except Exception``
    takes it for a failure to report, wrap or retry, while ``finally`` and ``except
    BaseException`` clean-ups run; and click, which answers a KeyboardInterrupt with a
    blank line and its Abort, lets it pass."""

    def __init__(self, signum: int = SIGINT):
        super().__init__(signum)
        self.signum = signum


_stopped = threading.Event()
_signum = [SIGINT]
_on_stop: list[Callable[[], object]] = []


def stop(signum: int = SIGINT) -> None:
    """Stop every thread of kiln's at its next chunk or wait, and wake those blocked in a
    read (in a thread of its own: the caller is a signal handler, which may have
    interrupted the very code that holds the locks the callbacks take)."""
    if _stopped.is_set():
        return
    _signum[0] = signum
    _stopped.set()
    threading.Thread(target=_run_callbacks, name="kiln-stopping", daemon=True).start()


def _run_callbacks() -> None:
    for callback in list(_on_stop):
        try:
            callback()
        except Exception:  # noqa: BLE001 - the others still run; the stop happens anyway
            pass


def on_stop(callback: Callable[[], object]) -> None:
    """Call ``callback`` when kiln is stopped (at once, if it already is)."""
    _on_stop.append(callback)
    if _stopped.is_set():
        callback()


def check() -> None:
    """Raise Interrupted once kiln has been stopped."""
    if _stopped.is_set():
        raise Interrupted(_signum[0])


def wait(seconds: float) -> None:
    """``time.sleep(seconds)`` that ends, raising Interrupted, as soon as kiln is stopped."""
    if _stopped.wait(seconds):
        raise Interrupted(_signum[0])
