"""The build cache as an image, for --cache-to and --cache-from (type=registry, type=local).

A cache image is an OCI image manifest whose config (media type CACHE_CONFIG) maps step
keys to their records (builder.cache: history entries and the step's layer) and whose
layers are the layers those records name, so a registry's garbage collection keeps them.
Keys hash only content (the base image's manifest digest, expanded instructions, build
args, the bytes of COPY sources), so every machine computes the same keys for the same
build, and a fresh runner finds its steps in a cache another machine wrote.

A cache read from a registry or a directory is untrusted: its records are checked as
``cache.well_formed`` checks the store's own, each layer blob is verified against its
digest and unpacked against its diff_id before a record is saved in the store, and the
document is read with the size limit of any image config. This module moves no bytes
itself: the CLI hands it a ``CacheSource`` (registry_client.build_cache) that opens blobs.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import BinaryIO

from builder import cache
from store.digest import sha256_digest
from store.documents import OCI_MANIFEST, Descriptor
from store.errors import KilnError
from store.image import BlobLayer
from store.store import Store

CACHE_CONFIG = "application/vnd.kiln.build-cache.config.v1+json"
CACHE_FORMAT = "kiln-build-cache-1"
MAX_RECORDS = 50_000
_HEX = frozenset("0123456789abcdef")


class CacheTransferError(KilnError):
    pass


def _descriptor(layer: dict) -> Descriptor:
    return Descriptor(layer["mediaType"], layer["digest"], layer["size"])


def document(store: Store, chains: list[list[str]], mounts: dict[str, dict] | None = None
             ) -> tuple[dict, list[tuple[Descriptor, str]]]:
    """The cache config for the keys of ``chains`` (the keys of each stage's steps, in
    order; those with a record whose layer the store has) and the cache mount layers
    ``mounts`` (id -> layer), and its layers' (descriptor, diff_id), each layer once."""
    records: dict[str, dict] = {}
    layers: dict[str, tuple[Descriptor, str]] = {}
    for key in (k for chain in chains for k in chain):
        rec = cache.read(store, key)
        if rec is None or key in records:
            continue
        layer = rec["layer"]
        if layer is not None:
            if not store.has_blob(layer["digest"]):
                continue
            layers.setdefault(layer["digest"], (_descriptor(layer), layer["diff_id"]))
        records[key] = {"format": rec["format"], "history": rec["history"], "layer": layer}
    for layer in (mounts or {}).values():
        layers.setdefault(layer["digest"], (_descriptor(layer), layer["diff_id"]))
    chains = [[k for k in chain if k in records] for chain in chains]
    doc = {"format": CACHE_FORMAT, "records": records, "chains": [c for c in chains if c]}
    if mounts:
        doc["mounts"] = mounts
    return doc, list(layers.values())


INLINE_KEY = cache.INLINE_KEY
MAX_MOUNT_ID = 1024


def mount_layers(store: Store, ids: list[str]) -> dict[str, dict]:
    """The contents of the shared RUN --mount=type=cache dirs ``ids`` (those this store
    has) as layer blobs in the store: id -> layer. Each is read under the shared lock its
    RUN steps take, so no step that holds it ``locked`` is writing meanwhile."""
    import fcntl
    import os

    from builder.mounts import cache_mount_dir

    out = {}
    for ident in ids:
        path = cache_mount_dir(str(store.root), ident)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            desc, diff_id = store.write_layer_blob(path)
        finally:
            os.close(fd)
        out[ident] = {"digest": desc.digest, "diff_id": diff_id,
                      "mediaType": desc.media_type, "size": desc.size}
    return out


def inline_document(store: Store, chains: list[list[str]], image_layers: set[str]) -> dict:
    """--cache-to type=inline: the cache of the image's own steps, to go into its config
    (as BuildKit's moby.buildkit.cache.v0): records whose layers are the image's only."""
    doc = document(store, chains)[0]
    records = {k: r for k, r in doc["records"].items()
               if r["layer"] is None or r["layer"]["digest"] in image_layers}
    return {"format": CACHE_FORMAT, "records": records,
            "chains": [[k for k in c if k in records] for c in doc["chains"]]}


class CacheImage:
    """A cache document and its layers as an image (store.image.Image) for copy_image."""

    def __init__(self, store: Store, chains: list[list[str]],
                 mounts: dict[str, dict] | None = None):
        doc, layers = document(store, chains, mounts)
        self._raw_config = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        self.mounts = len(mounts or {})
        self.records = len(doc["records"])
        self._layers = [BlobLayer(d, i, store.open_blob) for d, i in layers]
        self._manifest = {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": Descriptor(CACHE_CONFIG, sha256_digest(self._raw_config),
                                 len(self._raw_config)).to_json(),
            "layers": [d.to_json() for d, _ in layers]}
        self._raw = json.dumps(self._manifest, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        return sha256_digest(self._raw)

    @property
    def media_type(self) -> str:
        return OCI_MANIFEST

    def raw_manifest(self) -> bytes:
        return self._raw

    def manifest(self) -> dict:
        return self._manifest

    def raw_config(self) -> bytes:
        return self._raw_config

    def config(self) -> dict:
        return json.loads(self._raw_config)

    def layers(self) -> list[BlobLayer]:
        return self._layers


def parse_document(raw: bytes | dict, where: str) -> tuple[dict[str, dict], list[list[str]]]:
    """The records and chains of a cache config (or an inline cache's document) read from
    ``where``; refuses anything malformed."""
    try:
        doc = json.loads(raw) if isinstance(raw, bytes) else raw
    except ValueError as e:
        raise CacheTransferError(f"cache {where}: the cache config is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT:
        raise CacheTransferError(f"cache {where}: not a kiln build cache (format "
                                 f"{doc.get('format') if isinstance(doc, dict) else None!r})")
    records = doc.get("records")
    if not isinstance(records, dict) or len(records) > MAX_RECORDS:
        raise CacheTransferError(f"cache {where}: records must be an object of at most "
                                 f"{MAX_RECORDS} entries")
    for key, rec in records.items():
        if len(key) != 64 or not set(key) <= _HEX or not cache.well_formed(rec):
            raise CacheTransferError(f"cache {where}: malformed record {key[:80]!r}")
    chains = doc.get("chains", [])
    if not isinstance(chains, list) or not all(
            isinstance(c, list) and all(isinstance(k, str) and k in records for k in c)
            for c in chains) or sum(map(len, chains)) > MAX_RECORDS:
        raise CacheTransferError(f"cache {where}: malformed chains")
    return records, chains


def parse_mounts(raw: bytes | dict, where: str) -> dict[str, dict]:
    """The cache mount layers (id -> layer) of a cache config; refuses anything malformed."""
    doc = json.loads(raw) if isinstance(raw, bytes) else raw
    mounts = doc.get("mounts", {})
    if not isinstance(mounts, dict) or len(mounts) > MAX_RECORDS or not all(
            isinstance(k, str) and 0 < len(k) <= MAX_MOUNT_ID and cache.well_formed_layer(v)
            for k, v in mounts.items()):
        raise CacheTransferError(f"cache {where}: malformed cache mounts")
    return mounts


class CacheSource:
    """Records of one or more imported caches, brought into the store on a hit.

    ``open_blob(digest, size)`` gives a stream of a layer blob from where the cache lives
    (it need not verify: the store verifies what it takes in). A hit brings the layer's
    blob only (the build unpacks it if a step runs on top of it), after checking that its
    content is the diff_id the record claims; and it starts fetching, in the background,
    the layers of the steps that came after it when the cache was written, which a fresh
    runner is about to ask for."""

    PREFETCH = 4

    def __init__(self, store: Store, warn: Callable[[str], None] | None = None):
        self.store = store
        self.warn = warn
        self._records: dict[str, tuple[dict, Callable[[str, int], BinaryIO]]] = {}
        self._next: dict[str, list[str]] = {}  # key -> the keys after it in its stage
        self._mounts: dict[str, tuple[dict, Callable[[str, int], BinaryIO]]] = {}
        self._lock = threading.Lock()
        self._fetching: dict = {}  # layer digest -> the Future of its fetch
        self._pool = None  # a ThreadPoolExecutor once a layer is fetched

    def add(self, records: dict[str, dict], open_blob: Callable[[str, int], BinaryIO],
            chains: list[list[str]] = (), mounts: dict[str, dict] | None = None) -> None:
        for key, rec in records.items():
            self._records.setdefault(key, (rec, open_blob))
        for ident, layer in (mounts or {}).items():
            self._mounts.setdefault(ident, (layer, open_blob))
        for chain in chains:
            for i, key in enumerate(chain):
                self._next.setdefault(key, chain[i + 1:])

    def bring(self, key: str, steps: int) -> bool:
        """Whether ``key``'s record (covering ``steps`` steps) is in the store now: taken
        from an imported cache with its layer's blob when the store lacks it."""
        found = self._records.get(key)
        if found is None or len(found[0]["history"]) != steps:
            return False
        rec = found[0]
        try:
            if rec["layer"] is not None:
                self._fetch(key).result()
        except (KilnError, OSError) as e:  # a cache is an optimisation: the step runs
            if self.warn is not None:
                self.warn(f"--cache-from: cannot take step {key[:12]} from the cache: {e}")
            return False
        cache.save(self.store, key, history=rec["history"], layer=rec["layer"])
        for later in self._next.get(key, ()):
            if self._records.get(later, ({"layer": None},))[0]["layer"] is not None:
                self._fetch(later)
        return True

    def _fetch(self, key: str):
        rec, open_blob = self._records[key]
        layer = rec["layer"]
        with self._lock:
            future = self._fetching.get(layer["digest"])
            if future is None or (future.done() and future.exception() is not None):
                if self._pool is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._pool = ThreadPoolExecutor(self.PREFETCH,
                                                    thread_name_prefix="kiln-cache-fetch")
                future = self._pool.submit(self._bring_layer, layer, open_blob)
                self._fetching[layer["digest"]] = future
        return future

    def _put_blob(self, desc: Descriptor, open_blob: Callable[[str, int], BinaryIO]) -> None:
        """The blob into the store unless it is there (the store verifies its digest)."""
        if not self.store.has_blob(desc.digest):
            with open_blob(desc.digest, desc.size) as stream:
                self.store.put_blob(stream, desc.media_type, digest=desc.digest,
                                    size=desc.size)

    def _bring_layer(self, layer: dict, open_blob: Callable[[str, int], BinaryIO]) -> None:
        desc = _descriptor(layer)
        self._put_blob(desc, open_blob)
        if not self.store.has_layer_dir(layer["diff_id"]):
            # the record's diff_id goes into the image's config: check it is this content
            got = _diff_id(BlobLayer(desc, layer["diff_id"], self.store.open_blob))
            if got != layer["diff_id"]:
                raise CacheTransferError(f"layer {desc.digest} has diff_id {got}, not the "
                                         f"{layer['diff_id']} its record claims")

    def fill_mount(self, m, directory: str) -> bool:
        """Fill the new RUN --mount=type=cache dir ``directory`` (empty) of mount ``m`` from
        an imported cache that has its id; whether it did. The layer is extracted by the
        store's safe extractor, against its diff_id."""
        import os

        from store.fsutil import remove_tree
        from store.layer_extract import extract_layer

        found = self._mounts.get(m.id)
        if found is None:
            return False
        layer, open_blob = found
        desc = _descriptor(layer)
        unpacked = directory + ".cached"
        remove_tree(unpacked)  # a crash's leftover
        try:
            self._put_blob(desc, open_blob)
            with self.store.open_blob(desc.digest, desc.size) as blob:
                extract_layer(blob, desc.media_type, unpacked,
                              expected_diff_id=layer["diff_id"], layer_digest=desc.digest)
            os.rmdir(directory)
            os.rename(unpacked, directory)
        except (KilnError, OSError) as e:
            remove_tree(unpacked)
            if self.warn is not None:
                self.warn(f"--cache-from: cache mount {m.id!r} starts empty: {e}")
            return False
        if m.uid is not None or m.gid is not None:
            os.chown(directory, m.uid or 0, m.gid or 0)
        if m.mode is not None:
            os.chmod(directory, m.mode)
        return True

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _diff_id(layer: BlobLayer) -> str:
    """The layer's uncompressed digest, refusing a decompression bomb as the extractor does
    (within_budget; KILN_MAX_LAYER_SIZE, KILN_MAX_LAYER_RATIO, KILN_LAYER_RATIO_FROM)."""
    import hashlib

    from store.compression import (
        CountingReader,
        StreamError,
        compression_for,
        decompressed_chunks,
        within_budget,
    )
    from store.layer_extract import limits_from_env

    limits = limits_from_env()
    h = hashlib.sha256()
    with layer.open_compressed() as raw:
        blob = CountingReader(raw)
        head = blob.read(1 << 16)
        try:
            chunks = decompressed_chunks(blob, compression_for(layer.media_type, head), head,
                                         max_window_log=limits.max_zstd_window_log)
            for chunk in within_budget(chunks, blob, limits.budget()):
                h.update(chunk)
        except StreamError as e:
            raise CacheTransferError(f"layer {layer.digest}: {e}") from None
    return "sha256:" + h.hexdigest()
