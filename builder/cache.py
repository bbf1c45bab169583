"""The build step cache: key = hash(parent key, expanded instruction, visible build args,
source content); records in ``<store>/cache/<key>.json``, which prune treats as roots.

A record holds what a step's key cannot give back: the history entries (with their times)
of the steps it covers and the layer of a filesystem step. The rest of the image config is
a function of the chain of keys (each key hashes the expanded instruction), so the engine
recomputes it, and a record's size does not grow with the steps before it.

A record covers either one filesystem step (RUN, COPY, ADD, WORKDIR; ``layer`` may be
None for a WORKDIR that made nothing) or a run of metadata steps, stored under the key of
the last one (see ``Builder.flush_metadata``). Records of an older format are misses.
"""

from __future__ import annotations

import hashlib
import json
import os

from store.digest import validate_digest
from store.documents import LAYER_MEDIA_TYPES
from store.errors import DigestError
from store.fsutil import atomic_write
from store.store import Store

CACHE_VERSION = "kiln-build-cache-1"
INLINE_KEY = "kiln.build-cache.v1"  # an image config's field holding an inline cache
RECORD_FORMAT = 2
MAX_RECORD = 64 << 20  # bytes read from a record; a stage's budget keeps them far smaller


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


def read(store: Store, key: str) -> dict | None:
    """The record of ``key`` as stored, if it is well-formed (its layer may be gone)."""
    try:
        with open(_path(store, key), "rb") as f:
            rec = json.loads(f.read(MAX_RECORD))
    except (OSError, ValueError):
        return None
    return rec if well_formed(rec) else None


def well_formed(rec) -> bool:
    """Whether ``rec`` has a record's shape: also the check of a record from a remote
    cache (builder.cache_transfer), which is untrusted input."""
    if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT:
        return False
    history = rec.get("history")
    if not isinstance(history, list) or not history:
        return False
    for entry in history:
        if not isinstance(entry, dict) or not isinstance(entry.get("created"), str):
            return False
        if not isinstance(entry.get("created_by", ""), str) or not isinstance(
                entry.get("empty_layer", False), bool):
            return False
    layer = rec.get("layer")
    return layer is None or well_formed_layer(layer)


def well_formed_layer(layer) -> bool:
    """A record's layer: digest, diff_id, a layer media type and a size."""
    try:
        validate_digest(layer["digest"])
        validate_digest(layer["diff_id"])
        return (layer["mediaType"] in LAYER_MEDIA_TYPES and isinstance(layer["size"], int)
                and layer["size"] >= 0)
    except (DigestError, KeyError, TypeError):
        return False


def load(store: Store, key: str, steps: int) -> dict | None:
    """The record of ``key`` if it covers ``steps`` steps and the store has its layer's
    blob (the layer's dir is unpacked from it when a step needs it), else None."""
    rec = read(store, key)
    if rec is None or len(rec["history"]) != steps:
        return None
    layer = rec["layer"]
    if layer is not None and not store.has_blob(layer["digest"]):
        return None
    return rec


def describes(rec: dict, created_by: list[str]) -> bool:
    """Whether the record's history entries are those of steps written so. Keys hash the
    expanded instruction: ``COPY $F /x`` and ``COPY a /x`` may share one, not their history."""
    return [entry.get("created_by") for entry in rec["history"]] == created_by


def save(store: Store, key: str, *, history: list[dict], layer: dict | None) -> None:
    rec = {"format": RECORD_FORMAT, "history": history, "layer": layer,
           "blobs": [layer["digest"]] if layer else [],
           "diff_ids": [layer["diff_id"]] if layer else []}
    path = _path(store, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, json.dumps(rec, sort_keys=True, separators=(",", ":")).encode(),
                 tmp_dir=store.tmp, durable=False)
