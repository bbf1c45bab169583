"""Images in a ``docker save`` tarball: manifest.json, repositories, configs, layer tars.

Reading never trusts the archive: every path manifest.json names must be a
member inside it (one level of symlink allowed, as docker 25+ writes), sizes
are capped, and layer bytes are verified against the config's diff_ids.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tarfile
import tempfile
from collections.abc import Sequence
from typing import BinaryIO

from store.compression import sniff_compression
from store.digest import digest_hex, sha256_digest
from store.documents import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    MAX_CONFIG_BYTES,
    MAX_DOCUMENT_BYTES,
    Descriptor,
    canonical_json,
    decode_document,
    parse_config,
)
from store.errors import StoreError
from store.fsutil import new_file_in_place, remove_tree
from store.image import Image, Layer

_DOCKER_LAYER = {"none": "application/vnd.docker.image.rootfs.diff.tar",
                 "gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                 "zstd": "application/vnd.docker.image.rootfs.diff.tar.zstd"}


class _ArchiveLayer:
    def __init__(self, archive: DockerArchive, member: tarfile.TarInfo, diff_id: str):
        self._archive = archive
        self._member = member
        self.diff_id = diff_id
        self.size = member.size
        with self._raw() as f:
            self.media_type = _DOCKER_LAYER[sniff_compression(f.read(4))]
        self._digest: str | None = diff_id if self.media_type == _DOCKER_LAYER["none"] else None

    def _raw(self) -> BinaryIO:
        f = self._archive.tar.extractfile(self._member)
        if f is None:
            raise StoreError(f"{self._archive.path}: {self._member.name} is not a file")
        return f

    @property
    def digest(self) -> str:
        """Lazy: hashing a compressed member costs a pass, so only when asked."""
        if self._digest is None:
            h = hashlib.sha256()
            with self._raw() as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            self._digest = "sha256:" + h.hexdigest()
        return self._digest

    def open_compressed(self) -> BinaryIO:
        from store.digest import VerifyingReader

        return VerifyingReader(self._raw(), self.digest, self.size, what="layer")

    def open_uncompressed(self) -> BinaryIO:
        from store.compression import decompressing_reader

        return decompressing_reader(self.open_compressed())


class _ArchiveImage:
    def __init__(self, archive: DockerArchive, entry: dict, index: int):
        where = f"{archive.path}: manifest.json[{index}]"
        if not isinstance(entry, dict):
            raise StoreError(f"{where} is not an object")
        config_name = entry.get("Config")
        layer_names = entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise StoreError(f"{where} needs Config and Layers")
        self._raw_config = archive.read_member(config_name, limit=MAX_CONFIG_BYTES)
        self._config = parse_config(self._raw_config, media_type=DOCKER_CONFIG)
        diff_ids = self._config["rootfs"]["diff_ids"]
        if len(diff_ids) != len(layer_names):
            raise StoreError(f"{where}: {len(layer_names)} layers but the config lists "
                             f"{len(diff_ids)} diff_ids")
        self._layers = [_ArchiveLayer(archive, archive.member(name), diff_id)
                        for name, diff_id in zip(layer_names, diff_ids, strict=True)]
        tags = entry.get("RepoTags") or []
        self.repo_tags = [t for t in tags if isinstance(t, str)]
        self._raw_manifest: bytes | None = None

    def raw_config(self) -> bytes:
        return self._raw_config

    def config(self) -> dict:
        return self._config

    def layers(self) -> list[Layer]:
        return list(self._layers)

    @property
    def media_type(self) -> str:
        return DOCKER_MANIFEST

    def raw_manifest(self) -> bytes:
        if self._raw_manifest is None:
            doc = {
                "schemaVersion": 2,
                "mediaType": DOCKER_MANIFEST,
                "config": Descriptor(DOCKER_CONFIG, sha256_digest(self._raw_config),
                                     len(self._raw_config)).to_json(),
                "layers": [Descriptor(la.media_type, la.digest, la.size).to_json()
                           for la in self._layers],
            }
            self._raw_manifest = canonical_json(doc)
        return self._raw_manifest

    def manifest(self) -> dict:
        return json.loads(self.raw_manifest())

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw_manifest())


class DockerArchive:
    """A docker-archive opened for reading; ``images`` lists what manifest.json describes."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self.tar = tarfile.open(self.path, "r:*")  # noqa: SIM115 (closed by close())
            self._members = {self._clean(m.name): m for m in self.tar.getmembers()}
        except (tarfile.TarError, EOFError, OSError) as e:
            raise StoreError(f"cannot read docker-archive {self.path}: {e}") from None
        raw = self.read_member("manifest.json", limit=MAX_DOCUMENT_BYTES)
        entries = decode_document(raw, what=f"{self.path}: manifest.json", top=list)
        if not isinstance(entries, list) or not entries:
            raise StoreError(f"{self.path}: manifest.json must be a non-empty list")
        self.images = [_ArchiveImage(self, e, i) for i, e in enumerate(entries)]

    @staticmethod
    def _clean(name: str) -> str:
        return posixpath.normpath(name.lstrip("/")) if name not in ("", ".") else "."

    def member(self, name: str, _depth: int = 0) -> tarfile.TarInfo:
        if not isinstance(name, str) or not name or name.startswith("/") or "\0" in name:
            raise StoreError(f"{self.path}: manifest.json names {name!r}, not a path inside "
                             "the archive")
        clean = posixpath.normpath(name)
        if clean == ".." or clean.startswith("../"):
            raise StoreError(f"{self.path}: manifest.json names {name!r}, outside the archive")
        m = self._members.get(clean)
        if m is None:
            raise StoreError(f"{self.path}: manifest.json names {name!r}, not in the archive")
        if m.issym() and _depth == 0:
            return self.member(posixpath.join(posixpath.dirname(clean), m.linkname), 1)
        if not m.isfile():
            raise StoreError(f"{self.path}: {name!r} is not a regular file")
        return m

    def read_member(self, name: str, *, limit: int) -> bytes:
        m = self.member(name)
        if m.size > limit:
            raise StoreError(f"{self.path}: {name} is larger than {limit} bytes")
        f = self.tar.extractfile(m)
        assert f is not None
        return f.read(limit + 1)

    def close(self) -> None:
        self.tar.close()


class DockerArchiveSink:
    """copy_image destination that writes a ``docker save`` tarball when closed."""

    required_compression = "none"

    def __init__(self, path: str | os.PathLike, *, stream: BinaryIO | None = None,
                 tmp_dir: str | None = None):
        """``stream``: write the tarball there (``path`` only names it); blobs wait in
        ``tmp_dir`` (default: beside ``path``)."""
        self.path = os.fspath(path)
        self.stream = stream
        self._work = tempfile.mkdtemp(prefix=".kiln-save-", dir=tmp_dir or os.path.dirname(
            os.path.abspath(self.path)))
        self._blobs: dict[str, str] = {}
        self._entries: list[dict] = []
        self._repositories: dict[str, dict[str, str]] = {}

    def has_blob(self, digest: str) -> bool:
        return digest in self._blobs

    def put_blob(self, stream: BinaryIO, desc: Descriptor) -> None:
        from store.digest import VerifyingReader

        path = os.path.join(self._work, digest_hex(desc.digest))
        reader = VerifyingReader(stream, desc.digest, desc.size)
        with open(path, "wb") as out:
            while chunk := reader.read(1 << 20):
                out.write(chunk)
        self._blobs[desc.digest] = path

    def put_manifest(self, image: Image, raw: bytes, desc: Descriptor,
                     tags: Sequence[str]) -> None:
        manifest = json.loads(raw)
        config = manifest["config"]["digest"]
        layers = [la["digest"] for la in manifest["layers"]]
        entry = {"Config": digest_hex(config) + ".json", "RepoTags": [],
                 "Layers": [digest_hex(d) + ".tar" for d in layers]}
        for e in self._entries:  # one entry per image, all its names together, as docker does
            if e["Config"] == entry["Config"] and e["Layers"] == entry["Layers"]:
                entry = e
                break
        else:
            self._entries.append(entry)
        entry["RepoTags"] += [t for t in tags if t not in entry["RepoTags"]]
        for t in tags:
            repo, _, tag = t.rpartition(":")
            if layers:
                self._repositories.setdefault(repo, {})[tag] = digest_hex(layers[-1])

    def close(self) -> None:
        if self.stream is not None:
            try:
                self._write(self.stream)
            finally:
                remove_tree(self._work)
            return
        try:
            with new_file_in_place(self.path) as out:
                self._write(out)
        finally:
            remove_tree(self._work)

    def _write(self, out: BinaryIO) -> None:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            names = {}
            for e in self._entries:
                names[e["Config"]] = e["Config"]
                for la in e["Layers"]:
                    names[la] = la
            for name in sorted(names):
                digest = "sha256:" + name.split(".")[0]
                _add(tar, name, self._blobs[digest])
            _add_bytes(tar, "manifest.json", json.dumps(self._entries).encode())
            _add_bytes(tar, "repositories", json.dumps(self._repositories).encode())

    def abort(self) -> None:
        remove_tree(self._work)


def _add(tar: tarfile.TarFile, name: str, path: str) -> None:
    info = tarfile.TarInfo(name)
    info.size = os.path.getsize(path)
    info.mode = 0o644
    with open(path, "rb") as f:
        tar.addfile(info, f)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
