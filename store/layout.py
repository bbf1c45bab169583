"""An OCI image layout directory: blobs by digest and an index.json of tags.

The store root is one of these (plus kiln's own directories), and so is the
output of ``kiln save --format oci``; both go through this class.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from store.digest import VerifyingReader, digest_hex, validate_digest
from store.documents import (
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    MAX_DOCUMENT_BYTES,
    OCI_INDEX,
    Descriptor,
    canonical_json,
    parse_any,
    parse_index,
    parse_layout_header,
)
from store.errors import DigestError, ManifestError, NotFoundError, StoreError
from store.fsutil import atomic_write, fsync_dir
from store.locks import file_lock

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on start-up
if TYPE_CHECKING:
    from typing import BinaryIO

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_HEADER = b'{"imageLayoutVersion":"1.0.0"}'
_CHUNK = 1 << 20


class OCILayout:
    """Blobs and tags of an OCI image layout at ``root``.

    ``tmp`` is where partial writes live until they are renamed into place;
    ``index_lock`` serialises read-modify-write of index.json across processes.
    """

    def __init__(self, root: str | os.PathLike, *, tmp: Path | None = None,
                 index_lock: Path | None = None, durable: bool = True):
        self.root = Path(root)
        # False for a layout written for the user (save, copy to oci:), as cp or skopeo
        # write files: no fsync per blob. The store itself is always durable.
        self.durable = durable
        self.blobs = self.root / "blobs" / "sha256"
        self.tmp = tmp or self.root / "blobs"
        self._index_lock = index_lock

    # -- creation -------------------------------------------------------
    def create(self) -> None:
        """Make the layout skeleton if missing; refuse a directory that is something else."""
        header = self.root / "oci-layout"
        self.blobs.mkdir(parents=True, exist_ok=True)
        if header.exists():
            parse_layout_header(header.read_bytes()[: MAX_DOCUMENT_BYTES + 1])
        else:
            atomic_write(header, LAYOUT_HEADER)
        if not (self.root / "index.json").exists():
            self._write_index([])

    def check(self) -> None:
        """Raise StoreError unless ``root`` holds a readable OCI layout."""
        header = self.root / "oci-layout"
        if not header.is_file():
            raise StoreError(f"{self.root} is not an OCI image layout (no oci-layout file)")
        parse_layout_header(header.read_bytes()[: MAX_DOCUMENT_BYTES + 1])
        self.read_index()

    # -- blobs ----------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest_hex(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def put_blob(self, stream: BinaryIO, media_type: str, *, digest: str | None = None,
                 size: int | None = None) -> Descriptor:
        """Stream a blob in; sha256 (and size, when given) verified before it becomes visible."""
        if digest is not None:
            validate_digest(digest)
            if self.has_blob(digest):
                # Already here: still drain and verify so a caller's stream is checked.
                reader = VerifyingReader(stream, digest, size)
                reader.read_all_and_verify()
                return Descriptor(media_type, digest, self.blob_path(digest).stat().st_size)
        self.tmp.mkdir(parents=True, exist_ok=True)
        import tempfile  # with shutil and random: not on a no-op build's path

        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
        # a stream that checks this very digest at EOF (a registry or store reader) is
        # read to EOF below: hashing it a second time would only cost CPU
        trusted = digest is not None and getattr(stream, "verifies", None) == digest
        try:
            h = hashlib.sha256()
            total = 0
            with os.fdopen(fd, "wb") as f:
                while True:
                    want = _CHUNK if size is None else min(_CHUNK, size - total + 1)
                    chunk = stream.read(want)
                    if not chunk:
                        break
                    total += len(chunk)
                    if size is not None and total > size:
                        raise DigestError(
                            f"blob {digest or ''} is longer than its declared size {size}"
                        )
                    if not trusted:
                        h.update(chunk)
                    f.write(chunk)
                f.flush()
                if self.durable:
                    os.fsync(f.fileno())
            got = digest if trusted else "sha256:" + h.hexdigest()
            if size is not None and total != size:
                raise DigestError(f"blob {digest or got} has {total} bytes, declared size {size}")
            if digest is not None and got != digest:
                raise DigestError(f"blob {digest} does not match its content ({got})")
            self._install(tmp, got)
            return Descriptor(media_type, got, total)
        except BaseException:
            _unlink_quiet(tmp)
            raise

    def put_bytes(self, data: bytes, media_type: str) -> Descriptor:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not self.has_blob(digest):
            self.tmp.mkdir(parents=True, exist_ok=True)
            import tempfile

            fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    if self.durable:
                        os.fsync(f.fileno())
                self._install(tmp, digest)
            except BaseException:
                _unlink_quiet(tmp)
                raise
        return Descriptor(media_type, digest, len(data))

    def install_file(self, path: str | os.PathLike, digest: str) -> None:
        """Move a fully written, already verified file (in the same filesystem) into blobs/."""
        validate_digest(digest)
        self._install(os.fspath(path), digest)

    def _install(self, tmp: str, digest: str) -> None:
        final = self.blob_path(digest)
        os.chmod(tmp, 0o644)
        os.rename(tmp, final)  # same bytes if another writer won the race
        if self.durable:
            fsync_dir(self.blobs)

    def open_blob(self, digest: str, size: int | None = None) -> VerifyingReader:
        """A reader that raises DigestError at EOF (or early, when too long) on any mismatch."""
        try:
            raw = open(self.blob_path(digest), "rb")  # noqa: SIM115
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in {self.root}") from None
        return VerifyingReader(raw, digest, size)

    def read_blob(self, digest: str, size: int | None = None,
                  max_size: int = MAX_DOCUMENT_BYTES) -> bytes:
        """Read a small blob whole, verified; refuses anything over ``max_size``."""
        path = self.blob_path(digest)
        try:
            with open(path, "rb") as f:
                data = f.read(max_size + 1)
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in {self.root}") from None
        if len(data) > max_size:
            raise StoreError(f"blob {digest} is larger than the {max_size}-byte limit")
        if size is not None and len(data) != size:
            raise DigestError(f"blob {digest} has {len(data)} bytes, declared size {size}")
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got != digest:
            raise DigestError(f"blob {digest} does not match its content ({got})")
        return data

    def blob_digests(self) -> Iterator[str]:
        if not self.blobs.is_dir():
            return
        for name in os.listdir(self.blobs):
            if len(name) == 64:
                try:
                    yield validate_digest("sha256:" + name)
                except DigestError:
                    continue

    # -- index.json -----------------------------------------------------
    def read_index(self) -> list[Descriptor]:
        path = self.root / "index.json"
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_DOCUMENT_BYTES + 1)
        except FileNotFoundError:
            return []
        doc = parse_index(raw)
        return [Descriptor.from_json(m, where=f"index.json manifests[{i}]")
                for i, m in enumerate(doc.get("manifests", []))]

    def _write_index(self, manifests: list[Descriptor]) -> None:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX,
               "manifests": [m.to_json() for m in manifests]}
        atomic_write(self.root / "index.json", canonical_json(doc), tmp_dir=self.tmp
                     if self.tmp.is_dir() else None)

    @contextmanager
    def editing_index(self) -> Iterator[list[Descriptor]]:
        """Read-modify-write index.json under the index lock; the yielded list is written back."""
        lock = self._index_lock or (self.root / ".index.lock")
        with file_lock(lock):
            manifests = self.read_index()
            before = list(manifests)
            yield manifests
            if manifests != before:  # re-tagging an unchanged image writes (and fsyncs) nothing
                self._write_index(manifests)

    def tags(self) -> list[tuple[str, Descriptor]]:
        return [(m.annotations[REF_NAME], m) for m in self.read_index()
                if m.annotations and REF_NAME in m.annotations]

    def untagged(self) -> list[Descriptor]:
        """Entries without a ref name: images kept by digest alone (a build without -t)."""
        return [m for m in self.read_index() if not (m.annotations and REF_NAME in m.annotations)]

    def add_untagged(self, desc: Descriptor) -> None:
        """Keep ``desc`` in the index without a name, unless an entry already holds it."""
        if any(m.digest == desc.digest for m in self.read_index()):
            return  # a rebuild of the same image: nothing to check or write
        self.require_whole(desc.digest, desc)
        entry = Descriptor(desc.media_type, desc.digest, desc.size, platform=desc.platform)
        with self.editing_index() as manifests:
            if all(m.digest != desc.digest for m in manifests):
                manifests.append(entry)

    def remove_untagged(self, digest: str) -> bool:
        """Drop the nameless entries of ``digest``; whether there was one."""
        with self.editing_index() as manifests:
            kept = [m for m in manifests if m.digest != digest or (
                m.annotations and REF_NAME in m.annotations)]
            removed = len(kept) != len(manifests)
            manifests[:] = kept
        return removed

    def require_whole(self, name: str, desc: Descriptor) -> None:
        """Raise StoreError unless the manifest (or index) ``desc`` and every blob it names
        are here: its config and layers, an index's manifests and theirs. Blobs are only
        looked up, except the documents themselves (read, verified and parsed)."""
        seen: set[str] = set()
        todo = [(desc, "image")]
        while todo:
            d, role = todo.pop()
            if d.digest in seen:
                continue
            seen.add(d.digest)
            if not self.has_blob(d.digest):
                raise StoreError(f"cannot tag {name}: the {role} {d.digest} is not in "
                                 f"{self.root}; pull or load the image again")
            try:
                media_type, doc = parse_any(self.read_blob(d.digest, d.size), d.media_type)
            except ManifestError as e:
                raise StoreError(f"cannot tag {name}: {d.digest} is not an image manifest "
                                 f"or index ({e})") from None
            if media_type in INDEX_MEDIA_TYPES:
                todo += [(Descriptor.from_json(m, where=f"{d.digest} manifests[{i}]"),
                          f"manifest of index {d.digest}")
                         for i, m in enumerate(doc.get("manifests", []))]
                continue
            if media_type not in MANIFEST_MEDIA_TYPES:
                raise StoreError(f"cannot tag {name}: {d.digest} is a {media_type}, not an "
                                 "image manifest or index")
            for what, blob in [("config", doc["config"]),
                               *(("layer", la) for la in doc.get("layers", []))]:
                if not self.has_blob(blob["digest"]):
                    raise StoreError(f"cannot tag {name}: the {what} {blob['digest']} of "
                                     f"manifest {d.digest} is not in {self.root}; pull or "
                                     "load the image again")

    def set_tag(self, name: str, desc: Descriptor) -> None:
        """Point ``name`` at ``desc``, a manifest or index whose blobs are all here."""
        self.require_whole(name, desc)
        annotations = dict(desc.annotations or {})
        annotations[REF_NAME] = name
        entry = Descriptor(desc.media_type, desc.digest, desc.size, annotations=annotations,
                           platform=desc.platform)
        with self.editing_index() as manifests:
            if entry in manifests:
                return
            # the name replaces its old entry, and a nameless entry of the image: named, it
            # is no longer a dangling image
            manifests[:] = [m for m in manifests if not (
                (m.annotations and m.annotations.get(REF_NAME) == name)
                or (m.digest == desc.digest and not (m.annotations
                                                     and REF_NAME in m.annotations)))]
            manifests.append(entry)

    def remove_tag(self, name: str) -> Descriptor:
        with self.editing_index() as manifests:
            for i, m in enumerate(manifests):
                if m.annotations and m.annotations.get(REF_NAME) == name:
                    return manifests.pop(i)
        raise NotFoundError(f"no image tagged {name}")


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
