"""``kiln save`` and ``kiln load``: copy_image between the store and archives on disk."""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from store.docker_archive import DockerArchive, DockerArchiveSink
from store.documents import OCI_MANIFEST, Descriptor
from store.errors import KilnError, ReferenceError_, StoreError
from store.fsutil import current_umask, remove_tree
from store.image import Image, Progress, copy_image
from store.layout import REF_NAME
from store.oci_dir import (
    LayoutSink,
    LayoutSource,
    stream_oci_archive,
    unpack_oci_archive,
    write_oci_archive,
)
from store.reference import parse_reference
from store.signatures import LocalSignatures, copy_signature_manifest, is_signature_name
from store.store import Store, StoreSink

SAVE_FORMATS = ("oci", "oci-archive", "docker-archive")


def save(store: Store, names: Sequence[str], output: str | os.PathLike, *, fmt: str = "oci",
         compression: str | None = None, progress: Progress | None = None,
         signatures: bool = False) -> None:
    """Write the named images to ``output`` ("-": stdout, for an archive); nothing is left
    at ``output`` on failure. ``signatures``: with the images' cosign signatures, as
    more images of the archive (a registry's tag scheme), which podman load refuses."""
    if fmt not in SAVE_FORMATS:
        raise KilnError(f"unknown save format {fmt!r} (use one of {', '.join(SAVE_FORMATS)})")
    if fmt == "docker-archive" and compression not in (None, "none"):
        raise KilnError("docker-archive layers are always uncompressed (as docker save "
                        "writes them); drop --compression-format")
    # stdout is refused at once when it is a terminal, before any image is looked up
    stream = stdout_stream(f"a {fmt}") if os.fspath(output) == "-" else None
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
                    progress=progress, signatures=signatures, stream=stream)


def stdout_stream(what: str) -> BinaryIO:
    """kiln's stdout for an archive ("-o -"); refused when it is a terminal, as docker
    save refuses."""
    import sys

    if sys.stdout.isatty():
        raise KilnError(f"refusing to write {what} to a terminal: give -o FILE or redirect "
                        "stdout")
    sys.stdout.flush()
    return sys.stdout.buffer


def save_images(store: Store, images: Sequence[tuple[Image, list[str]]],
                output: str | os.PathLike, *, fmt: str = "oci", compression: str | None = None,
                progress: Progress | None = None, concurrency: int = 1,
                signatures: bool = False, stream: BinaryIO | None = None) -> list[Descriptor]:
    """``save`` for images already in hand (the builder's result, tagged or not); returns
    the descriptors of the manifests written. Holds the store lock: re-compressed layers
    are written in the store's tmp/, which a prune or a starting kiln would clean.
    ``output`` "-": the archive goes to ``stream``, by default kiln's stdout."""
    if os.fspath(output) == "-":
        if fmt == "oci":
            raise KilnError("an OCI layout is a directory, which stdout cannot be: write an "
                            "oci-archive or a docker-archive there")
        stream = stream or stdout_stream(f"a {fmt}")
    with store.writing():
        return _save_images(store, images, output, fmt=fmt, compression=compression,
                            progress=progress, concurrency=concurrency,
                            signatures=signatures, stream=stream)


def _save_images(store: Store, images: Sequence[tuple[Image, list[str]]],
                 output: str | os.PathLike, *, fmt: str, compression: str | None,
                 progress: Progress | None, concurrency: int, signatures: bool,
                 stream: BinaryIO | None) -> list[Descriptor]:
    output = Path(output)
    if fmt == "docker-archive" and compression not in (None, "none"):
        raise KilnError("docker-archive layers are always uncompressed (as docker save "
                        "writes them); drop --compression-format")
    parent = Path(store.tmp) if stream is not None else output.parent
    if fmt == "docker-archive":
        sink = DockerArchiveSink(output, stream=stream, tmp_dir=str(parent))
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
            # re-compressed images are no longer what was signed
            if signatures and desc.digest == image.digest:
                _export_signatures(store, image.digest, sink.layout)
        if stream is not None:
            stream_oci_archive(work, stream)
            stream.flush()
        elif fmt == "oci-archive":
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


def _load_stdin(store: Store, progress: Progress | None) -> list[str]:
    """An archive on stdin is read into the store's tmp/ first: both formats are read
    out of order (a docker-archive's manifest.json comes last)."""
    import shutil
    import sys

    if sys.stdin.isatty():
        raise KilnError("refusing to read an archive from a terminal: give -i FILE or "
                        "redirect stdin")
    with store.writing():
        fd, tmp = tempfile.mkstemp(dir=store.tmp, prefix="load-stdin-")
        try:
            with os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(sys.stdin.buffer, f, 1 << 20)
            return load(store, tmp, progress=progress)
        finally:
            os.unlink(tmp)


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
    """Load every image in an archive or layout ("-": an archive on stdin) into the store;
    returns the names tagged."""
    if os.fspath(path) == "-":
        return _load_stdin(store, progress)
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
