"""tqdm progress for blob copies: one bar per blob and one for the total on a terminal,
silence otherwise. Blobs move in several threads at once, so updates take a lock."""

from __future__ import annotations

import sys
import threading


def blob_progress(quiet: bool = False):
    """A copy_image progress callback, or None when stderr is not a terminal."""
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}
    done: dict[str, int] = {}
    lock = threading.Lock()
    total = tqdm(total=0, unit="B", unit_scale=True, desc="total", position=0)

    def update(desc, moved: int) -> None:
        with lock:
            bar = bars.get(desc.digest)
            if bar is None:
                bar = bars[desc.digest] = tqdm(total=desc.size, unit="B", unit_scale=True,
                                               desc=desc.digest[7:19], leave=False)
                total.total += desc.size
                total.refresh()
            bar.update(moved - bar.n)
            total.update(moved - done.get(desc.digest, 0))
            done[desc.digest] = moved
            if moved >= desc.size:
                bar.close()

    return update
