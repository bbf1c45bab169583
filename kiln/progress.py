"""tqdm progress for blob copies: one bar per blob on a terminal, silence otherwise."""

from __future__ import annotations

import sys


def blob_progress(quiet: bool = False):
    """A copy_image progress callback, or None when stderr is not a terminal."""
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(desc, done: int) -> None:
        bar = bars.get(desc.digest)
        if bar is None:
            bar = bars[desc.digest] = tqdm(total=desc.size, unit="B", unit_scale=True,
                                           desc=desc.digest[7:19], leave=False)
        bar.update(done - bar.n)
        if done >= desc.size:
            bar.close()

    return update
