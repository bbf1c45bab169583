"""Stopping when kiln is told to (a Ctrl-C, a CI system's SIGTERM)."""

from __future__ import annotations

SIGINT, SIGTERM = 2, 15  # the numbers, without the signal module's start-up cost


class Interrupted(BaseException):
    """kiln was told to stop by signal ``signum``. Not an Exception: no ``except Exception``
    takes it for a failure to report, wrap or retry, while ``finally`` and ``except
    BaseException`` clean-ups run; and click, which answers a KeyboardInterrupt with a
    blank line and its Abort, lets it pass."""

    def __init__(self, signum: int = SIGINT):
        super().__init__(signum)
        self.signum = signum
