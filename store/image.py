"""The one image model: a small read-only Image/Layer interface, and copy_image.

Wherever an image lives (the store, an OCI layout directory or archive, a
docker-archive tarball, later a registry) it is read through ``Image`` and
written through an ``ImageSink``; ``copy_image`` moves only the blobs the
destination lacks and verifies every digest as the bytes stream past.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from store.compression import OCI_LAYER_FOR, compression_of, decompressing_reader
from store.digest import sha256_digest
from store.documents import (
    CONFIG_MEDIA_TYPES,
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    MAX_CONFIG_BYTES,
    MAX_DOCUMENT_BYTES,
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    canonical_json,
    parse_config,
    parse_manifest,
)
from store.errors import ManifestError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on start-up
if TYPE_CHECKING:
    from typing import BinaryIO, Protocol
else:
    Protocol = object  # the interfaces below are for the type checker: plain classes at run time

Progress = Callable[[Descriptor, int], None]  # (blob being moved, bytes moved so far)
STOP_WAIT = 1.0  # seconds an interrupted copy_image waits for its moves to stop


class Layer(Protocol):
    media_type: str
    digest: str
    size: int
    diff_id: str

    def open_compressed(self) -> BinaryIO: ...

    def open_uncompressed(self) -> BinaryIO: ...


class Image(Protocol):
    @property
    def digest(self) -> str: ...

    @property
    def media_type(self) -> str: ...

    def raw_manifest(self) -> bytes: ...

    def manifest(self) -> dict: ...

    def raw_config(self) -> bytes: ...

    def config(self) -> dict: ...

    def layers(self) -> list[Layer]: ...


class ImageSink(Protocol):
    # The compression a destination insists on (docker-archive: "none"), or None.
    required_compression: str | None

    def has_blob(self, digest: str) -> bool: ...

    def put_blob(self, stream: BinaryIO, desc: Descriptor) -> None: ...

    def put_manifest(self, image: Image, raw: bytes, desc: Descriptor,
                     tags: Sequence[str]) -> None: ...


@dataclass
class BlobLayer:
    """A layer whose compressed blob is readable through ``open_blob(digest, size)``."""

    desc: Descriptor
    diff_id: str
    opener: Callable[[str, int], BinaryIO] = field(repr=False)

    @property
    def media_type(self) -> str:
        return self.desc.media_type

    @property
    def digest(self) -> str:
        return self.desc.digest

    @property
    def size(self) -> int:
        return self.desc.size

    def open_compressed(self) -> BinaryIO:
        return self.opener(self.desc.digest, self.desc.size)

    def open_uncompressed(self) -> BinaryIO:
        compression_of(self.media_type)  # refuses a media type that is no layer
        return decompressing_reader(self.open_compressed())


class ManifestImage:
    """An image given by its manifest bytes and a blob reader: the store and OCI layouts."""

    def __init__(self, raw_manifest: bytes, desc: Descriptor,
                 read_blob: Callable[[str, int], bytes],
                 open_blob: Callable[[str, int], BinaryIO]):
        self._raw = raw_manifest
        self._desc = desc
        self._manifest = parse_manifest(raw_manifest, media_type=desc.media_type)
        self._read_blob = read_blob
        self._open_blob = open_blob
        self._raw_config: bytes | None = None
        self._config: dict | None = None

    @property
    def digest(self) -> str:
        return self._desc.digest

    @property
    def descriptor(self) -> Descriptor:
        return self._desc

    @property
    def media_type(self) -> str:
        return self._manifest.get("mediaType") or self._desc.media_type

    def raw_manifest(self) -> bytes:
        return self._raw

    def manifest(self) -> dict:
        return self._manifest

    def config_descriptor(self) -> Descriptor:
        return Descriptor.from_json(self._manifest["config"], where="manifest config")

    def raw_config(self) -> bytes:
        if self._raw_config is None:
            cd = self.config_descriptor()
            if cd.size <= MAX_DOCUMENT_BYTES:
                self._raw_config = self._read_blob(cd.digest, cd.size)
            elif cd.size <= MAX_CONFIG_BYTES:  # a long history: read as a (verified) stream
                with self._open_blob(cd.digest, cd.size) as stream:
                    self._raw_config = stream.read()
                if len(self._raw_config) != cd.size:
                    raise ManifestError(f"config {cd.digest}: {len(self._raw_config)} bytes, "
                                        f"declared {cd.size}")
            else:
                raise ManifestError(f"config {cd.digest}: {cd.size} bytes is over the "
                                    f"{MAX_CONFIG_BYTES} byte limit")
        return self._raw_config

    def config(self) -> dict:
        if self._config is None:
            media_type = self.config_descriptor().media_type
            if media_type not in CONFIG_MEDIA_TYPES:  # e.g. application/octet-stream
                media_type = DOCKER_CONFIG if self.media_type == DOCKER_MANIFEST else None
            self._config = parse_config(self.raw_config(), media_type=media_type)
        return self._config

    def layers(self) -> list[Layer]:
        descs = [Descriptor.from_json(d, where=f"manifest layers[{i}]")
                 for i, d in enumerate(self._manifest.get("layers", []))]
        diff_ids = self.config()["rootfs"]["diff_ids"]
        if len(diff_ids) != len(descs):
            raise ManifestError(
                f"image {self.digest}: manifest has {len(descs)} layers but config lists "
                f"{len(diff_ids)} diff_ids"
            )
        return [BlobLayer(d, diff_id, self._open_blob) for d, diff_id in zip(descs, diff_ids,
                                                                           strict=True)]


class _ProgressReader:
    def __init__(self, raw: BinaryIO, desc: Descriptor, progress: Progress | None,
                 abort: threading.Event | None = None):
        self._raw, self._desc, self._progress, self._done = raw, desc, progress, 0
        self._abort = abort

    def read(self, n: int = -1) -> bytes:
        if self._abort is not None and self._abort.is_set():
            raise _Aborted()
        data = self._raw.read(n)
        self._done += len(data)
        if self._progress and data:
            self._progress(self._desc, self._done)
        return data

    @property
    def verifies(self) -> str | None:
        return getattr(self._raw, "verifies", None)

    def close(self) -> None:
        self._raw.close()


class _Aborted(Exception):
    """Another transfer of the same copy failed; this one stops at its next read."""


def recompress_layer(layer: Layer, compression: str, tmp_dir: str | None = None
                     ) -> tuple[Descriptor, str]:
    """Write ``layer`` re-compressed to a temp file; returns (descriptor, temp path).

    The diff_id must come out unchanged, or the source lied about its content.
    """
    import tempfile

    from store.layer_writer import compress_stream

    fd, path = tempfile.mkstemp(dir=tmp_dir, prefix="recompress-")
    try:
        with os.fdopen(fd, "wb") as out, layer.open_uncompressed() as src:
            blob = compress_stream(src, out, compression=compression)
            out.flush()
            os.fsync(out.fileno())
        if blob.diff_id != layer.diff_id:
            raise ManifestError(
                f"layer {layer.digest}: uncompressed content has digest {blob.diff_id}, "
                f"config says {layer.diff_id}"
            )
        return Descriptor(blob.media_type, blob.digest, blob.size), path
    except BaseException:
        os.unlink(path)
        raise


def copy_image(src: Image, dst: ImageSink, *, tags: Sequence[str] = (),
               compression: str | None = None, progress: Progress | None = None,
               tmp_dir: str | None = None, concurrency: int = 1) -> Descriptor:
    """Copy ``src`` into ``dst``; returns the descriptor of the manifest written there.

    ``compression`` (zstd/gzip/none) picks how layers leave; layers already in
    that form are moved as they are, so their digests and the manifest stay.
    ``concurrency`` layers move at once where the sink allows it (``dst.concurrency``).
    """
    want = compression or dst.required_compression
    abort = threading.Event()

    def move(layer: Layer) -> tuple[Descriptor, bool]:
        desc = Descriptor(layer.media_type, layer.digest, layer.size)
        if want is not None and compression_of(layer.media_type) != want:
            new_desc, path = recompress_layer(layer, want, tmp_dir)
            try:
                if not dst.has_blob(new_desc.digest):
                    with open(path, "rb") as f:
                        dst.put_blob(_ProgressReader(f, new_desc, progress, abort), new_desc)
            finally:
                os.unlink(path)
            return new_desc, True
        if not dst.has_blob(desc.digest):
            with layer.open_compressed() as stream:
                reader = _ProgressReader(stream, desc, progress, abort)
                put_layer = getattr(dst, "put_layer", None)
                if put_layer is not None:
                    put_layer(reader, desc, layer.diff_id)
                else:
                    dst.put_blob(reader, desc)
        return desc, False

    all_layers = src.layers()
    layers = list({layer.digest: layer for layer in all_layers}.values())  # each blob once
    workers = max(1, min(concurrency, getattr(dst, "concurrency", 1), len(layers)))
    if workers == 1:
        results = [move(layer) for layer in layers]
    else:
        from concurrent.futures import ThreadPoolExecutor
        from concurrent.futures import wait as wait_for

        pool = ThreadPoolExecutor(workers, thread_name_prefix="kiln-copy")
        futures = [pool.submit(move, layer) for layer in layers]
        try:
            results = [f.result() for f in futures]
        except BaseException as first:
            abort.set()  # the other moves stop at their next read
            pool.shutdown(wait=False, cancel_futures=True)
            if not isinstance(first, Exception):
                # Interrupted: when kiln is (store.interrupt), a read or a retry's wait
                # that blocks ends too. The moves are waited for only that long, so that
                # their temp files are gone when this returns; never for a transfer or a
                # wait to end.
                wait_for(futures, timeout=STOP_WAIT)
                raise
            try:  # the first real failure, not a sibling's _Aborted
                for f in futures:
                    if f.done() and not f.cancelled():
                        e = f.exception()
                        if e is not None and not isinstance(e, _Aborted):
                            raise e from None
                raise
            finally:
                wait_for(futures)
        pool.shutdown()
    moved = {layer.digest: result for layer, result in zip(layers, results, strict=True)}
    new_layers = [moved[layer.digest][0] for layer in all_layers]
    changed = any(c for _, c in results)

    manifest = src.manifest()
    config_desc = Descriptor.from_json(manifest["config"], where="manifest config")
    if not dst.has_blob(config_desc.digest):
        dst.put_blob(io.BytesIO(src.raw_config()), config_desc)

    raw = src.raw_manifest()
    media_type = src.media_type
    if changed:
        raw, media_type = rewrite_manifest(manifest, config_desc, new_layers)
    desc = Descriptor(media_type, sha256_digest(raw), len(raw))
    dst.put_manifest(src, raw, desc, tags)
    return desc


def rewrite_manifest(manifest: dict, config_desc: Descriptor, layers: list[Descriptor]
                      ) -> tuple[bytes, str]:
    """An OCI manifest naming the re-compressed layers (Docker schema2 has no zstd type)."""
    cfg = config_desc
    if cfg.media_type == DOCKER_CONFIG:
        cfg = Descriptor(OCI_CONFIG, cfg.digest, cfg.size)
    doc: dict = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": cfg.to_json(),
        "layers": [Descriptor(OCI_LAYER_FOR[compression_of(d.media_type)], d.digest,
                              d.size).to_json() for d in layers],
    }
    if manifest.get("annotations"):
        doc["annotations"] = manifest["annotations"]
    return canonical_json(doc), OCI_MANIFEST


