"""``kiln save`` and ``kiln load``: copy_image between the store and archives on disk."""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from store.docker_archive import DockerArchive, DockerArchiveSink
from store.documents import OCI_MANIFEST, Descriptor
from store.errors import KilnError, ReferenceError_, StoreError
from store.fsutil import current_umask, remove_tree
from store.image import Image, Progress, copy_image
from store.layout import REF_NAME
from store.oci_dir import LayoutSink, LayoutSource, unpack_oci_archive, write_oci_archive
from store.reference import parse_reference
from store.signatures import LocalSignatures, copy_signature_manifest, is_signature_name
from store.store import Store, StoreSink

SAVE_FORMATS = ("oci", "oci-archive", "docker-archive")


def save(store: Store, names: Sequence[str], output: str | os.PathLike, *, fmt: str = "oci",
         compression: str | None = None, progress: Progress | None = None) -> None:
    """Write the named images to ``output``; nothing is left at ``output`` on failure."""
    if fmt not in SAVE_FORMATS:
        raise KilnError(f"unknown save format {fmt!r} (use one of {', '.join(SAVE_FORMATS)})")
    output = Path(output)
    if fmt == "docker-archive" and compression not in (None, "none"):
        raise KilnError("docker-archive layers are always uncompressed (as docker save "
                        "writes them); drop --compression-format")
    images = []
    with store.writing():  # a prune meanwhile could take an image untagged since resolved
        for name in names:
            desc = store.resolve(name)
            tags = store.names_of(desc.digest)
            try:
                ref = str(parse_reference(name))
                tags = [ref] if ref in tags else tags[:1]
            except ReferenceError_:
                tags = tags[:1]  # named by ID: keep one of its tags, if it has any
            images.append((store.image_for(desc), tags))
        save_images(store, images, output, fmt=fmt, compression=compression,
                    progress=progress)


def save_images(store: Store, images: Sequence[tuple[Image, list[str]]],
                output: str | os.PathLike, *, fmt: str = "oci", compression: str | None = None,
                progress: Progress | None = None, concurrency: int = 1) -> list[Descriptor]:
    """``save`` for images already in hand (the builder's result, tagged or not); returns
    the descriptors of the manifests written. Holds the store lock: re-compressed layers
    are written in the store's tmp/, which a prune or a starting kiln would clean."""
    with store.writing():
        return _save_images(store, images, output, fmt=fmt, compression=compression,
                            progress=progress, concurrency=concurrency)


def _save_images(store: Store, images: Sequence[tuple[Image, list[str]]],
                 output: str | os.PathLike, *, fmt: str, compression: str | None,
                 progress: Progress | None, concurrency: int) -> list[Descriptor]:
    output = Path(output)
    if fmt == "docker-archive" and compression not in (None, "none"):
        raise KilnError("docker-archive layers are always uncompressed (as docker save "
                        "writes them); drop --compression-format")
    parent = output.parent
    if fmt == "docker-archive":
        sink = DockerArchiveSink(output)
        try:
            written = [copy_image(image, sink, tags=tags, progress=progress,
                                  tmp_dir=str(store.tmp)) for image, tags in images]
        except BaseException:
            sink.abort()
            raise
        sink.close()
        return written
    into_existing = fmt == "oci" and output.exists()
    if into_existing and not (output / "oci-layout").exists() and any(output.iterdir()):
        raise KilnError(f"{output} exists and is not an OCI layout; refusing to write into it")
    work = None if into_existing else Path(tempfile.mkdtemp(dir=parent,
                                                            prefix=f".{output.name}."))
    if work is not None:
        os.chmod(work, 0o777 & ~current_umask())  # as any directory the user creates
    # the index lock lives in the store, not in the user's layout
    lock = store.locks / ("layout-" + hashlib.sha256(os.fsencode(os.path.abspath(output)))
                          .hexdigest()[:16] + ".lock")
    try:
        sink = LayoutSink(output if into_existing else work, index_lock=lock)
        written = [copy_image(image, sink, tags=tags, compression=compression,
                              progress=progress, tmp_dir=str(store.tmp),
                              concurrency=concurrency)
                   for image, tags in images]
        for (image, _), desc in zip(images, written, strict=True):
            if desc.digest == image.digest:  # re-compressed images are no longer what was signed
                _export_signatures(store, image.digest, sink.layout)
        if fmt == "oci-archive":
            write_oci_archive(work, output)
        elif work is not None:
            os.rename(work, output)
            work = None
    finally:
        if work is not None:
            remove_tree(work)
    return written


def _export_signatures(store: Store, digest: str, layout) -> None:
    """An image's cosign signatures travel with it into an OCI layout, tagged as in a
    registry (``<repo>:sha256-<hex>.sig``)."""
    for name, desc in LocalSignatures(store).entries_for(digest):
        raw = store.read_blob(desc.digest, desc.size)
        copied = copy_signature_manifest(raw, store.read_blob, layout.put_bytes, where=name)
        layout.set_tag(name, Descriptor(OCI_MANIFEST, copied.digest, copied.size))


def _import_signatures(store: Store, source: LayoutSource, entry: Descriptor, name: str
                       ) -> None:
    raw = source.layout.read_blob(entry.digest, entry.size)
    copied = copy_signature_manifest(raw, source.layout.read_blob, store.put_bytes, where=name)
    store.tag(name, Descriptor(OCI_MANIFEST, copied.digest, copied.size))


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "oci-layout").is_file():
            return "oci"
        raise StoreError(f"{path} is a directory but not an OCI layout")
    try:
        with tarfile.open(path, "r:*") as tar:
            names = {m.name.removeprefix("./") for m in tar.getmembers()}
    except (tarfile.TarError, EOFError, OSError) as e:
        raise StoreError(f"cannot read {path}: {e}") from None
    if "manifest.json" in names:
        return "docker-archive"
    if "oci-layout" in names:
        return "oci-archive"
    raise StoreError(f"{path} is neither a docker-archive nor an oci-archive "
                     "(no manifest.json or oci-layout inside)")


def load(store: Store, path: str | os.PathLike, *, progress: Progress | None = None
         ) -> list[str]:
    """Load every image in an archive or layout into the store; returns the names tagged."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"cannot load {path}: no such file or directory")
    fmt = detect_format(path)
    loaded: list[str] = []
    with store.writing(), StoreSink(store) as sink:
        if fmt == "docker-archive":
            archive = DockerArchive(path)
            try:
                for image in archive.images:
                    tags = [str(parse_reference(t)) for t in image.repo_tags]
                    desc = copy_image(image, sink, tags=tags, compression="zstd",
                                      progress=progress, tmp_dir=str(store.tmp))
                    loaded.extend(tags or [desc.digest])
            finally:
                archive.close()
            return loaded
        work = None
        try:
            if fmt == "oci-archive":
                work = store.mkdtemp("load-")
                unpack_oci_archive(path, work)
                source = LayoutSource(work)
            else:
                source = LayoutSource(path)
            for entry in source.entries():
                name = (entry.annotations or {}).get(REF_NAME)
                if name and is_signature_name(name):
                    _import_signatures(store, source, entry, name)
                    continue
                tags = []
                if name:
                    try:
                        tags = [str(parse_reference(name))]
                    except ReferenceError_:
                        tags = []
                desc = copy_image(source.image(entry), sink, tags=tags, progress=progress,
                                  tmp_dir=str(store.tmp))
                loaded.extend(tags or [desc.digest])
        finally:
            if work is not None:
                remove_tree(work)
    return loaded
