"""The local store: an OCI image layout plus kiln's own directories.

    <root>/oci-layout, index.json, blobs/sha256/   the OCI layout (tags in index.json)
    <root>/layers/<diff_id hex>/diff/              unpacked layers, overlay lowerdirs
    <root>/cache/  containers/  keys/  tmp/  locks/

Every writer holds ``locks/store.lock`` shared (``Store.writing()``) from its first
write (a file in tmp/, a blob, a layer dir) to the tag that makes the result reachable;
``prune`` takes it exclusive (``Store.collecting()``), so it never sees a writer's work
half done: what is in tmp/, or in blobs/ and layers/ without a name yet, belongs to a
process that died. ``Store.tag`` refuses a manifest whose blobs are not all here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from store.digest import digest_hex, validate_digest
from store.documents import INDEX_MEDIA_TYPES, Descriptor, parse_index
from store.errors import DigestError, NotFoundError, ReferenceError_, StoreError
from store.fsutil import is_host_root, remove_tree
from store.image import Image, ManifestImage
from store.layout import REF_NAME, OCILayout
from store.locks import file_lock
from store.reference import parse_reference

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on start-up
if TYPE_CHECKING:
    from typing import BinaryIO

SUBDIRS = ("blobs/sha256", "layers", "cache", "containers", "keys", "tmp", "locks")


def default_root() -> Path:
    env = os.environ.get("KILN_ROOT")
    if env:
        return Path(env)
    if is_host_root():
        return Path("/var/lib/kiln")
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                             "share")
    return Path(data) / "kiln"


def host_platform() -> dict:
    machine = os.uname().machine  # platform.machine(), without importing platform
    arch, variant = {
        "x86_64": ("amd64", None), "amd64": ("amd64", None), "aarch64": ("arm64", None),
        "arm64": ("arm64", None), "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
        "i386": ("386", None), "i686": ("386", None), "ppc64le": ("ppc64le", None),
        "s390x": ("s390x", None), "riscv64": ("riscv64", None),
    }.get(machine, (machine, None))
    p = {"architecture": arch, "os": "linux"}
    if variant:
        p["variant"] = variant
    return p


@dataclass(frozen=True)
class TaggedImage:
    name: str  # the full reference, e.g. docker.io/library/busybox:latest
    descriptor: Descriptor


class Store:
    def __init__(self, root: str | os.PathLike | None = None, *, create: bool = True):
        self.root = Path(root) if root is not None else default_root()
        self.root = Path(os.path.abspath(self.root))
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"
        self.layers_dir = self.root / "layers"
        self.cache_dir = self.root / "cache"
        self.containers_dir = self.root / "containers"
        self.layout = OCILayout(self.root, tmp=self.tmp, index_lock=self.locks / "index.lock")
        if create:
            self._create()
        elif not (self.root / "oci-layout").is_file():
            raise StoreError(f"no kiln store at {self.root}")

    def _create(self) -> None:
        try:
            for sub in SUBDIRS:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(self.root / "keys", 0o700)
            if not (self.root / "index.json").is_file() or not (self.root / "oci-layout").is_file():
                with self.writing(), file_lock(self.locks / "index.lock"):
                    self.layout.create()
        except PermissionError as e:
            raise StoreError(f"cannot create the store at {self.root}: {e.strerror}; "
                             "use --root or KILN_ROOT to pick a writable directory") from None
        if any(os.scandir(self.tmp)):
            self._clean_tmp_if_idle()

    # -- locks ----------------------------------------------------------
    @contextmanager
    def writing(self) -> Iterator[None]:
        """Held (shared) by every operation that adds to the store."""
        with file_lock(self.locks / "store.lock", exclusive=False):
            yield

    @contextmanager
    def collecting(self) -> Iterator[None]:
        """Held (exclusive) by garbage collection: no writer runs meanwhile."""
        with file_lock(self.locks / "store.lock", exclusive=True):
            yield

    def _clean_tmp_if_idle(self) -> None:
        """A crash leaves garbage in tmp/: remove it when no other kiln is writing."""
        fd = os.open(self.locks / "store.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            self.clean_tmp()
        finally:
            os.close(fd)

    def clean_tmp(self) -> int:
        """Remove everything in tmp/; only call with the store lock held exclusive."""
        removed = 0
        for entry in os.scandir(self.tmp):
            remove_tree(entry.path)
            removed += 1
        return removed

    def mkdtemp(self, prefix: str) -> str:
        """A private work dir in tmp/; made 0755 so it can be renamed into place as it is."""
        import tempfile  # with shutil and random: not for a no-op build

        path = tempfile.mkdtemp(dir=self.tmp, prefix=prefix)
        os.chmod(path, 0o755)
        return path

    # -- blobs ----------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        return self.layout.has_blob(digest)

    def put_blob(self, stream: BinaryIO, media_type: str, *, digest: str | None = None,
                 size: int | None = None) -> Descriptor:
        return self.layout.put_blob(stream, media_type, digest=digest, size=size)

    def put_bytes(self, data: bytes, media_type: str) -> Descriptor:
        return self.layout.put_bytes(data, media_type)

    def open_blob(self, digest: str, size: int | None = None):
        return self.layout.open_blob(digest, size)

    def read_blob(self, digest: str, size: int | None = None) -> bytes:
        return self.layout.read_blob(digest, size)

    # -- images ---------------------------------------------------------
    def tags(self) -> list[TaggedImage]:
        return [TaggedImage(name, d) for name, d in self.layout.tags()]

    def tag(self, name: str, desc: Descriptor) -> str:
        """Name the manifest (or index) ``desc``. Refused with a StoreError naming the
        missing digest unless it and all its blobs are in the store; that is checked with
        the store lock held, so no prune runs between the check and the tag. A writer
        holds the lock itself from its first write to this tag: then prune cannot take
        what it wrote in between either."""
        ref = parse_reference(name)
        if ref.digest:
            raise ReferenceError_(f"cannot tag with a digest reference {name!r}")
        full = str(ref)
        with self.writing():
            self.layout.set_tag(full, desc)
        return full

    def pin(self, name: str, desc: Descriptor) -> None:
        """Keep ``desc`` under ``name@digest`` (a pull by digest), checked as ``tag`` is."""
        with self.writing():
            self.layout.set_tag(name, desc)

    def keep_untagged(self, desc: Descriptor) -> None:
        """Keep the image ``desc`` without a name (``kiln build`` without -t): an index.json
        entry with no ref name, listed as ``<none>``, found by its ID or digest, until it is
        named, removed with ``kiln rmi ID`` or pruned as a dangling image. Nothing is added
        when a name or another entry already holds it."""
        with self.writing():
            self.layout.add_untagged(desc)

    def untagged(self) -> list[Descriptor]:
        return self.layout.untagged()

    def untag(self, name: str) -> Descriptor:
        with self.writing():
            return self.layout.remove_tag(str(parse_reference(name)))

    def resolve(self, name: str) -> Descriptor:
        """A manifest descriptor for a tag, a full digest, or an image-ID prefix."""
        index = self.layout.read_index()
        tags = [TaggedImage(m.annotations[REF_NAME], m) for m in index
                if m.annotations and REF_NAME in m.annotations]
        if _looks_like_id(name):
            hexpart = name.removeprefix("sha256:")
            hits = {m.digest: m for m in index
                    if self._image_id(m).startswith(hexpart)
                    or digest_hex(m.digest).startswith(hexpart)}
            if len(hits) == 1:
                return next(iter(hits.values()))
            if len(hits) > 1:
                raise StoreError(f"image ID prefix {name!r} is ambiguous")
        ref = parse_reference(name)
        if ref.digest:
            for t in tags:  # a pull by digest of an index is kept under the digest asked for
                if t.name == str(ref):
                    return t.descriptor
            for m in index:
                if m.digest == ref.digest:
                    return m
            if self.has_blob(ref.digest):
                return Descriptor("application/vnd.oci.image.manifest.v1+json", ref.digest,
                                  os.path.getsize(self.layout.blob_path(ref.digest)))
            raise NotFoundError(f"image {name} is not in the store")
        full = str(ref)
        for t in tags:
            if t.name == full:
                return t.descriptor
        raise NotFoundError(f"image {full} is not in the store (see `kiln images`)")

    def _image_id(self, desc: Descriptor) -> str:
        try:
            return digest_hex(self.image_for(desc).config_descriptor().digest)
        except StoreError:
            return ""

    def image(self, name: str) -> ManifestImage:
        return self.image_for(self.resolve(name))

    def image_for(self, desc: Descriptor, *, platform: dict | None = None) -> ManifestImage:
        raw = self.read_blob(desc.digest, None)
        if desc.media_type in INDEX_MEDIA_TYPES:
            return self.image_for(pick_platform(parse_index(raw), platform or host_platform(),
                                                where=desc.digest))
        return ManifestImage(raw, desc, self.read_blob, self.open_blob)

    def names_of(self, digest: str) -> list[str]:
        return [t.name for t in self.tags() if t.descriptor.digest == digest]

    # -- layers ---------------------------------------------------------
    def layer_dir(self, diff_id: str) -> Path:
        """``layers/<hex>/diff``: the unpacked layer, an overlay lowerdir."""
        return self.layers_dir / digest_hex(diff_id) / "diff"

    def has_layer_dir(self, diff_id: str) -> bool:
        return self.layer_dir(diff_id).is_dir()

    def ensure_layer_dir(self, layer) -> Path:
        """Unpack ``layer`` (an image.Layer) once, under a per-layer lock; return its dir."""
        final = self.layer_dir(layer.diff_id)
        if final.is_dir():
            return final
        from store.layer_extract import extract_layer

        with file_lock(self.locks / f"layer-{digest_hex(layer.diff_id)}.lock"):
            if final.is_dir():
                return final
            work = Path(self.mkdtemp("layer-"))
            try:
                with layer.open_compressed() as blob:
                    extract_layer(blob, layer.media_type, work / "diff",
                                  expected_diff_id=layer.diff_id, layer_digest=layer.digest)
                os.rename(work, final.parent)
            except BaseException:
                remove_tree(work)
                raise
        return final

    def adopt_layer_dir(self, diff_dir: str | os.PathLike, diff_id: str) -> Path:
        """Move an already unpacked, verified layer dir into ``layers/`` (no copy)."""
        validate_digest(diff_id)
        final = self.layer_dir(diff_id)
        with file_lock(self.locks / f"layer-{digest_hex(diff_id)}.lock"):
            if final.is_dir():
                remove_tree(diff_dir)
                return final
            work = Path(self.mkdtemp("layer-"))
            os.rename(diff_dir, work / "diff")
            os.rename(work, final.parent)
        return final

    def commit_layer(self, diff_dir: str | os.PathLike, *, compression: str = "zstd",
                     epoch: int | None = None) -> tuple[Descriptor, str]:
        """A RUN/COPY step's upper dir becomes a layer: tarred once into a blob, then moved
        (not copied) into ``layers/``. Returns (blob descriptor, diff_id)."""
        desc, diff_id = self.write_layer_blob(diff_dir, compression=compression, epoch=epoch)
        self.adopt_layer_dir(diff_dir, diff_id)
        return desc, diff_id

    def write_layer_blob(self, diff_dir: str | os.PathLike, *, compression: str = "zstd",
                         epoch: int | None = None) -> tuple[Descriptor, str]:
        """The blob half of commit_layer: tar ``diff_dir`` into blobs/ and leave the dir
        where it is (a build may still use it as a lower dir)."""
        import tempfile

        from store.layer_writer import write_layer

        fd, blob_path = tempfile.mkstemp(dir=self.tmp, prefix="commit-")
        try:
            with os.fdopen(fd, "wb") as out:
                blob = write_layer(diff_dir, out, compression=compression,
                                   source_date_epoch=epoch)
                out.flush()
                os.fsync(out.fileno())
            self.layout.install_file(blob_path, blob.digest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(blob_path)
            raise
        return Descriptor(blob.media_type, blob.digest, blob.size), blob.diff_id

    def layer_diff_ids_on_disk(self) -> list[str]:
        out = []
        for name in os.listdir(self.layers_dir):
            try:
                out.append(validate_digest("sha256:" + name))
            except DigestError:
                continue
        return out

    def unpack_image(self, image: Image) -> list[Path]:
        return [self.ensure_layer_dir(layer) for layer in image.layers()]

    # -- containers (written by runtime; read here for rmi and prune) ---
    def containers_using(self, manifest_digest: str) -> list[str]:
        import json

        users = []
        if not self.containers_dir.is_dir():
            return users
        for entry in os.scandir(self.containers_dir):
            try:
                with open(os.path.join(entry.path, "state.json"), "rb") as f:
                    state = json.loads(f.read(1 << 20))
            except (OSError, ValueError):
                continue
            if isinstance(state, dict) and state.get("image") == manifest_digest:
                users.append(entry.name)
        return users


class StoreSink:
    """copy_image destination: the store, all or nothing per image.

    Blobs are staged under tmp/ and layers unpacked (diff_ids verified) there;
    only when every piece of an image has checked out are the blobs renamed
    into blobs/, the layer dirs into layers/ and the tags written. Bad input
    therefore leaves no blob, layer or tag behind. Use as a context manager
    so a failure removes the stage.
    """

    required_compression = None
    concurrency = 8  # put_blob/put_layer may run in several threads at once

    def __init__(self, store: Store, *, unpack: bool = True):
        self.store = store
        self.unpack = unpack
        self.written: list[Descriptor] = []
        self._stage = Path(store.mkdtemp("stage-"))
        self._staged = OCILayout(self._stage, tmp=self._stage)
        self._staged.blobs.mkdir(parents=True)
        self._unpacked: dict[str, Path] = {}  # diff_id -> staged dir, from put_layer
        self._lock = threading.Lock()

    def __enter__(self) -> StoreSink:
        return self

    def __exit__(self, *exc) -> None:
        remove_tree(self._stage)

    def has_blob(self, digest: str) -> bool:
        return self.store.has_blob(digest) or self._staged.has_blob(digest)

    def put_blob(self, stream: BinaryIO, desc: Descriptor) -> None:
        self._staged.put_blob(stream, desc.media_type, digest=desc.digest, size=desc.size)

    def put_layer(self, stream: BinaryIO, desc: Descriptor, diff_id: str) -> None:
        """Stage a layer blob and unpack it in the same pass over the bytes (a pull that
        leaves the image ready to run). Thread-safe for distinct layers."""
        from store.layer_extract import extract_layer

        validate_digest(diff_id)
        if not self.unpack or self.store.has_layer_dir(diff_id):
            self.put_blob(stream, desc)
            return
        dest = self._stage / "layers" / digest_hex(diff_id) / "diff"
        dest.parent.mkdir(parents=True)
        tee = _BlobTee(stream, desc, self._stage)
        try:
            extract_layer(tee, desc.media_type, dest, expected_diff_id=diff_id,
                          layer_digest=desc.digest)
            self._staged.install_file(tee.finish(), desc.digest)
        finally:
            tee.close()
        with self._lock:
            self._unpacked[diff_id] = dest

    def _read(self, digest: str, size: int | None = None) -> bytes:
        source = self._staged if self._staged.has_blob(digest) else self.store.layout
        return source.read_blob(digest, size)

    def _open(self, digest: str, size: int | None = None):
        source = self._staged if self._staged.has_blob(digest) else self.store.layout
        return source.open_blob(digest, size)

    def put_manifest(self, image: Image, raw: bytes, desc: Descriptor,
                     tags: Sequence[str]) -> None:
        from store.layer_extract import extract_layer

        self._staged.put_bytes(raw, desc.media_type)
        staged_image = ManifestImage(raw, desc, self._read, self._open)
        unpacked: list[tuple[Path, str]] = []
        for layer in staged_image.layers():
            if not self.store.has_blob(layer.digest) and not self._staged.has_blob(layer.digest):
                raise StoreError(f"layer {layer.digest} of image {desc.digest} was not copied")
            if self.unpack and not self.store.has_layer_dir(layer.diff_id):
                dest = self._stage / "layers" / digest_hex(layer.diff_id) / "diff"
                if layer.diff_id in self._unpacked:
                    unpacked.append((dest, layer.diff_id))
                elif not dest.exists():
                    dest.parent.mkdir(parents=True)
                    with layer.open_compressed() as blob:
                        extract_layer(blob, layer.media_type, dest,
                                      expected_diff_id=layer.diff_id, layer_digest=layer.digest)
                    unpacked.append((dest, layer.diff_id))
        staged_image.config()
        # Everything verified: commit blobs (the manifest last), then layers, then tags.
        for digest in sorted(self._staged.blob_digests(), key=lambda d: d == desc.digest):
            self.store.layout.install_file(self._staged.blob_path(digest), digest)
        for dest, diff_id in unpacked:
            self.store.adopt_layer_dir(dest, diff_id)
        for t in tags:
            self.store.tag(t, desc)
        self.written.append(desc)


class _BlobTee:
    """Reads through to the extractor while writing and hashing the compressed bytes."""

    def __init__(self, stream: BinaryIO, desc: Descriptor, tmp_dir: Path):
        self._stream = stream
        self._desc = desc
        import tempfile

        fd, self._path = tempfile.mkstemp(dir=tmp_dir, prefix="blob-")
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._seen = 0
        # the stream checks this digest itself at EOF (finish reads to EOF): hash once
        self._trusted = getattr(stream, "verifies", None) == desc.digest

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        if data:
            self._seen += len(data)
            if self._seen > self._desc.size:
                raise DigestError(f"blob {self._desc.digest} is longer than its declared size "
                                  f"{self._desc.size}")
            if not self._trusted:
                self._hash.update(data)
            self._file.write(data)
        return data

    def readable(self) -> bool:
        return True

    def finish(self) -> str:
        """Drain what the extractor left (compression trailers), verify, return the file."""
        while self.read(1 << 20):
            pass
        got = self._desc.digest if self._trusted else "sha256:" + self._hash.hexdigest()
        if self._seen != self._desc.size:
            raise DigestError(f"blob {self._desc.digest} has {self._seen} bytes, declared size "
                              f"{self._desc.size}")
        if got != self._desc.digest:
            raise DigestError(f"blob {self._desc.digest} does not match its content ({got})")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._path

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)


def pick_platform(index: dict, want: dict, *, where: str) -> Descriptor:
    manifests = [Descriptor.from_json(m, where=f"{where} manifests[{i}]")
                 for i, m in enumerate(index.get("manifests", []))]
    for m in manifests:
        p = m.platform or {}
        if p.get("os") == want["os"] and p.get("architecture") == want["architecture"] and (
                "variant" not in want or p.get("variant") in (None, want["variant"])):
            return m
    have = ", ".join(f"{(m.platform or {}).get('os')}/{(m.platform or {}).get('architecture')}"
                     for m in manifests)
    raise NotFoundError(f"index {where} has no image for {want['os']}/{want['architecture']} "
                        f"(it has: {have or 'nothing'})")


def _looks_like_id(name: str) -> bool:
    hexpart = name.removeprefix("sha256:")
    return 3 <= len(hexpart) <= 64 and all(c in "0123456789abcdef" for c in hexpart) and (
        "/" not in name)


__all__ = ["Store", "StoreSink", "TaggedImage", "default_root", "host_platform", "REF_NAME"]
