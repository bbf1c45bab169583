"""Images in an OCI layout directory (``oci:DIR``) or its tar (``oci-archive:FILE``)."""

from __future__ import annotations

import os
import re
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from store.documents import INDEX_MEDIA_TYPES, Descriptor, parse_index
from store.errors import StoreError
from store.fsutil import new_file_in_place
from store.image import Image, ManifestImage
from store.layout import REF_NAME, OCILayout

_LAYOUT_MEMBER = re.compile(
    r"(?:oci-layout|index\.json|blobs/?|blobs/sha256/?|blobs/sha256/[0-9a-f]{64})"
)


class LayoutSource:
    """Read images out of an OCI layout directory, verifying every blob read."""

    def __init__(self, path: str | os.PathLike):
        self.layout = OCILayout(path)
        self.layout.check()

    def entries(self) -> list[Descriptor]:
        return self.layout.read_index()

    def image(self, entry: Descriptor, platform: dict | None = None) -> ManifestImage:
        raw = self.layout.read_blob(entry.digest, entry.size)
        if entry.media_type in INDEX_MEDIA_TYPES:
            from store.store import host_platform, pick_platform

            chosen = pick_platform(parse_index(raw, media_type=entry.media_type),
                                   platform or host_platform(), where=entry.digest)
            return self.image(chosen, platform)
        return ManifestImage(raw, entry, self.layout.read_blob, self.layout.open_blob)

    def find(self, name: str | None) -> Descriptor:
        entries = self.entries()
        if name is None:
            if len(entries) == 1:
                return entries[0]
            raise StoreError(f"{self.layout.root} holds {len(entries)} images: name one")
        for e in entries:
            if e.annotations and e.annotations.get(REF_NAME) == name:
                return e
        raise StoreError(f"{self.layout.root} has no image named {name!r}")


class LayoutSink:
    """copy_image destination writing an OCI layout directory."""

    required_compression = None
    concurrency = 8  # blobs land through mkstemp + rename: safe from several threads

    def __init__(self, path: str | os.PathLike, *, index_lock: Path | None = None):
        self.layout = OCILayout(path, index_lock=index_lock, durable=False)
        self.layout.create()

    def has_blob(self, digest: str) -> bool:
        return self.layout.has_blob(digest)

    def put_blob(self, stream: BinaryIO, desc: Descriptor) -> None:
        self.layout.put_blob(stream, desc.media_type, digest=desc.digest, size=desc.size)

    def put_manifest(self, image: Image, raw: bytes, desc: Descriptor,
                     tags: Sequence[str]) -> None:
        self.layout.put_bytes(raw, desc.media_type)
        if not tags:
            self.layout.add_untagged(desc)
        for t in tags:
            self.layout.set_tag(t, desc)


def unpack_oci_archive(archive: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy an oci-archive's layout files into ``dest``; only layout names, regular files.

    Blob digests are checked later, as every read of a layout blob is verified.
    """
    dest = Path(dest)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = member.name.removeprefix("./").rstrip("/")
                if not name or name == ".":
                    continue
                if not _LAYOUT_MEMBER.fullmatch(name):
                    raise StoreError(f"oci-archive {archive}: unexpected member {member.name!r}")
                if member.isdir():
                    (dest / name).mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isfile():
                    raise StoreError(f"oci-archive {archive}: member {member.name!r} "
                                     "is not a regular file")
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                with open(target, "xb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    except (tarfile.TarError, EOFError) as e:
        raise StoreError(f"cannot read oci-archive {archive}: {e}") from None
    except FileExistsError as e:
        raise StoreError(f"oci-archive {archive}: duplicate member {e.filename}") from None


def write_oci_archive(layout_dir: str | os.PathLike, archive: str | os.PathLike) -> None:
    """Tar a layout directory deterministically, then rename it into place."""
    with new_file_in_place(archive) as out:
        stream_oci_archive(layout_dir, out)


def stream_oci_archive(layout_dir: str | os.PathLike, out: BinaryIO) -> None:
    """Tar a layout directory deterministically into ``out`` (which need not seek)."""
    layout_dir = Path(layout_dir)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name in ["oci-layout", "index.json"] + [
                f"blobs/sha256/{b}" for b in sorted(os.listdir(layout_dir / "blobs/sha256"))]:
            _add_file(tar, layout_dir / name, name)


def _add_file(tar: tarfile.TarFile, path: Path, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.size = path.stat().st_size
    info.mode = 0o644
    info.mtime = 0
    with open(path, "rb") as f:
        tar.addfile(info, f)
