"""``kiln prune``: remove what nothing reachable refers to.

Roots are the entries of index.json (tags, and images kept without a name until
``kiln prune`` removes them as dangling), the images of containers, and build cache
records. Runs with the store lock held exclusive, so a concurrent writer
either finished before (its tag is a root) or starts after: every writer holds
the lock shared from its first write to its tag (store.store). What is left in
tmp/, or unnamed in blobs/ and layers/, is a dead writer's and goes.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

from store.digest import digest_hex, validate_digest
from store.documents import (
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    MAX_CONFIG_BYTES,
    parse_any,
    parse_config,
)
from store.errors import DigestError, KilnError
from store.fsutil import remove_tree
from store.store import Store

# A record holds the history text of its steps, which a build bounds at 64 MiB in all
# (builder.shell.MAX_BUILD_TEXT): one RUN line of more than 1 MiB is a record of that size.
MAX_RECORD_BYTES = 128 << 20


@dataclass
class PruneReport:
    blobs: int = 0
    layers: int = 0
    tmp: int = 0
    bytes: int = 0
    cache: int = 0
    dangling: int = 0  # images without a name removed


def _walk(store: Store, digest: str, blobs: set[str], diff_ids: set[str]) -> None:
    """Mark a manifest or index and everything below it."""
    if digest in blobs or not store.has_blob(digest):
        return
    blobs.add(digest)
    try:
        media_type, doc = parse_any(store.read_blob(digest))
    except KilnError:
        return  # not a document (or unreadable): keep the blob itself, nothing below
    if media_type in INDEX_MEDIA_TYPES:
        for m in doc.get("manifests", []):
            _walk(store, m["digest"], blobs, diff_ids)
    elif media_type in MANIFEST_MEDIA_TYPES:
        blobs.add(doc["config"]["digest"])
        for layer in doc.get("layers", []):
            blobs.add(layer["digest"])
        try:
            config = parse_config(store.layout.read_blob(doc["config"]["digest"],
                                                         max_size=MAX_CONFIG_BYTES))
            diff_ids.update(config.get("rootfs", {}).get("diff_ids", []))
        except KilnError:
            pass
        subject = doc.get("subject")
        if subject:
            blobs.add(subject["digest"])


def _cache_roots(store: Store) -> tuple[set[str], set[str]]:
    """Build cache records are JSON with ``blobs`` and ``diff_ids`` lists (builder writes them).

    A name starting with a dot is a temp file of an atomic write (atomic_write's
    ``.tmp-*``, the context cache's ``.<name>.*.tmp``); with the store lock held exclusive
    its writer is dead (killed midway), so it goes."""
    blobs: set[str] = set()
    diff_ids: set[str] = set()
    for dirpath, _, files in os.walk(store.cache_dir):
        for name in files:
            if name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(dirpath, name))
                continue
            try:
                with open(os.path.join(dirpath, name), "rb") as f:
                    rec = json.loads(f.read(MAX_RECORD_BYTES))
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict):
                blobs.update(d for d in rec.get("blobs", []) if isinstance(d, str))
                diff_ids.update(d for d in rec.get("diff_ids", []) if isinstance(d, str))
    return blobs, diff_ids


def reachable(store: Store) -> tuple[set[str], set[str]]:
    blobs: set[str] = set()
    diff_ids: set[str] = set()
    for entry in store.layout.read_index():  # tags, and images kept without a name
        _walk(store, entry.digest, blobs, diff_ids)
    if store.containers_dir.is_dir():
        for entry in os.scandir(store.containers_dir):
            try:
                with open(os.path.join(entry.path, "state.json"), "rb") as f:
                    image = json.loads(f.read(1 << 20)).get("image")
                _walk(store, validate_digest(image), blobs, diff_ids)
            except (OSError, ValueError, AttributeError, DigestError):
                continue
    cache_blobs, cache_diff_ids = _cache_roots(store)
    for d in cache_blobs:
        try:
            _walk(store, validate_digest(d), blobs, diff_ids)
        except DigestError:
            continue
    diff_ids |= cache_diff_ids
    return blobs, diff_ids


def _remove_unrecorded_containers(store: Store) -> int:
    """A container dir without its state.json: `kiln run` makes both under the store lock,
    so with the lock held exclusive it is what a run killed in between left."""
    removed = 0
    if not store.containers_dir.is_dir():
        return removed
    for entry in os.scandir(store.containers_dir):
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        if not os.path.lexists(os.path.join(entry.path, "state.json")):
            remove_tree(entry.path)
            removed += 1
    return removed


def _remove_dangling(store: Store) -> int:
    """Images kept without a name (``kiln build`` without -t), as ``docker image prune``
    removes them; those a container uses stay."""
    removed = 0
    for entry in store.untagged():
        if not store.containers_using(entry.digest):
            removed += store.layout.remove_untagged(entry.digest)
    return removed


def prune(store: Store, *, build_cache: bool = False, dangling: bool = False) -> PruneReport:
    """Remove what nothing reachable refers to; ``build_cache`` drops the build step cache
    (records, context stat caches, RUN --mount=type=cache dirs) first, as `builder prune`;
    ``dangling`` first removes the images that have no name (``kiln prune`` does)."""
    report = PruneReport()
    with store.collecting():
        report.tmp = store.clean_tmp() + _remove_unrecorded_containers(store)
        if dangling:
            report.dangling = _remove_dangling(store)
        if build_cache:
            for path in (store.cache_dir, store.root / "cache-mounts"):
                if path.is_dir():
                    for entry in os.scandir(path):
                        remove_tree(entry.path)
                        report.cache += 1
        keep_blobs, keep_layers = reachable(store)
        for digest in list(store.layout.blob_digests()):
            if digest not in keep_blobs:
                path = store.layout.blob_path(digest)
                try:
                    report.bytes += path.stat().st_size
                    path.unlink()
                    report.blobs += 1
                except FileNotFoundError:
                    pass
        for diff_id in store.layer_diff_ids_on_disk():
            if diff_id not in keep_layers:
                remove_tree(store.layers_dir / digest_hex(diff_id))
                report.layers += 1
    return report
