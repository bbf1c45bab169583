"""The build step cache: key = hash(parent key, expanded instruction, visible build args,
source content); records in ``<store>/cache/<key>.json``, which prune treats as roots."""

from __future__ import annotations

import hashlib
import json
import os

from store.digest import validate_digest
from store.errors import DigestError
from store.fsutil import atomic_write
from store.store import Store

CACHE_VERSION = "kiln-build-cache-1"


def step_key(parent: str, instruction: str, *, args: dict[str, str] | None = None,
             content: str | None = None, extra: dict | None = None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, parent, instruction, sorted((args or {}).items()),
                         content, extra or {}], separators=(",", ":")).encode())
    return h.hexdigest()


def _path(store: Store, key: str) -> str:
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(f"bad cache key {key!r}")
    return os.path.join(store.cache_dir, key[:2], key + ".json")


def load(store: Store, key: str) -> dict | None:
    """A record whose layer (if any) is still whole in the store, else None."""
    try:
        with open(_path(store, key), "rb") as f:
            rec = json.loads(f.read(1 << 22))
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or "config" not in rec:
        return None
    layer = rec.get("layer")
    if layer is not None:
        try:
            validate_digest(layer["digest"])
            validate_digest(layer["diff_id"])
        except (DigestError, KeyError, TypeError):
            return None
        if not store.has_blob(layer["digest"]) or not store.has_layer_dir(layer["diff_id"]):
            return None
    return rec


def save(store: Store, key: str, *, config: dict, layer: dict | None) -> None:
    rec = {"config": config, "layer": layer,
           "blobs": [layer["digest"]] if layer else [],
           "diff_ids": [layer["diff_id"]] if layer else []}
    path = _path(store, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, json.dumps(rec, sort_keys=True).encode(), tmp_dir=store.tmp,
                 durable=False)
