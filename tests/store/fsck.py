"""A test-side consistency check of a store: everything tagged is whole and verifies."""

from __future__ import annotations

import os

from store.store import Store


def check_store(store: Store) -> int:
    """Raise if any tagged image is broken; returns the number of images checked."""
    checked = 0
    for tagged in store.tags():
        image = store.image_for(tagged.descriptor)
        image.config()
        for layer in image.layers():
            with layer.open_compressed() as r:
                while r.read(1 << 20):
                    pass
            assert store.layer_dir(layer.diff_id).is_dir(), f"layer dir of {layer.diff_id}"
        checked += 1
    leftovers = [n for n in os.listdir(store.root / "blobs" / "sha256") if len(n) != 64]
    assert not leftovers, leftovers
    return checked
