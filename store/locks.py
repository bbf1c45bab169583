"""fcntl locks on files under ``<root>/locks``.

Writers hold the store lock shared for their whole operation; ``prune``
holds it exclusive, so garbage collection never races a writer. Finer locks
serialise index.json updates and the extraction of one layer.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def file_lock(path: str | os.PathLike, *, exclusive: bool = True) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing drops the flock
