"""Images to a registry: a copy_image sink that HEADs, mounts or uploads each blob."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import BinaryIO

from registry_client.errors import RegistryError
from registry_client.remote import RemoteRepository
from registry_client.transport import RegistryOptions
from store.blobinfo import BlobInfoCache
from store.compression import compression_of
from store.digest import sha256_digest
from store.documents import OCI_MANIFEST, Descriptor
from store.fsutil import atomic_write
from store.image import (
    Image,
    ManifestImage,
    Progress,
    copy_image,
    recompress_layer,
    rewrite_manifest,
)
from store.reference import Reference, parse_reference
from store.store import Store


class RemoteSink:
    """copy_image destination: one repository on a registry."""

    required_compression = None
    concurrency = 8

    def __init__(self, repo: RemoteRepository, blob_info: BlobInfoCache | None = None,
                 reopen=None):
        self.repo = repo
        self.reopen = reopen  # Descriptor -> a seekable copy of the blob, for retried chunks
        self.blob_info = blob_info
        self.registry = repo.transport.registry
        self.mounted: list[str] = []
        self.uploaded: list[str] = []

    def has_blob(self, digest: str) -> bool:
        return self.repo.blob_exists(digest, push=True)

    def put_blob(self, stream: BinaryIO, desc: Descriptor) -> None:
        if self.blob_info is not None:
            for other in self.blob_info.locations(desc.digest, self.registry):
                if other != self.repo.repository and self._try_mount(desc.digest, other):
                    self.mounted.append(desc.digest)
                    self._remember(desc.digest)
                    return
        self.repo.upload_blob(stream, desc, reopen=self.reopen)
        self.uploaded.append(desc.digest)
        self._remember(desc.digest)

    def _try_mount(self, digest: str, other: str) -> bool:
        try:
            return self.repo.mount_blob(digest, other)
        except RegistryError:  # no pull right on the other repository, ...: upload instead
            return False

    def _remember(self, digest: str) -> None:
        if self.blob_info is not None:
            self.blob_info.add_location(digest, self.registry, self.repo.repository)

    def put_manifest(self, image: Image, raw: bytes, desc: Descriptor,
                     tags: Sequence[str]) -> None:
        for ref in list(tags) or [desc.digest]:
            self.repo.put_manifest(raw, desc.media_type, ref)


def with_compression(store: Store, image: ManifestImage, compression: str | None
                     ) -> ManifestImage:
    """``image`` with every layer in ``compression``: a layer re-compressed before is taken
    from the store (both digests remembered); others are re-compressed once and kept."""
    if compression is None:
        return image
    layers = image.layers()
    if all(compression_of(layer.media_type) == compression for layer in layers):
        return image
    cache = BlobInfoCache(store.root)
    descs: list[Descriptor] = []
    for layer in layers:
        if compression_of(layer.media_type) == compression:
            descs.append(Descriptor(layer.media_type, layer.digest, layer.size))
            continue
        known = cache.compressed(layer.diff_id, compression)
        if known is not None and store.has_blob(known["digest"]):
            descs.append(Descriptor(known["mediaType"], known["digest"], known["size"]))
            continue
        desc, path = recompress_layer(layer, compression, str(store.tmp))
        try:
            store.layout.install_file(path, desc.digest)
        except BaseException:
            os.unlink(path)
            raise
        cache.remember_compressed(layer.diff_id, compression, desc.digest, desc.media_type,
                                  desc.size)
        descs.append(desc)
    raw, media_type = rewrite_manifest(image.manifest(), image.config_descriptor(), descs)
    return ManifestImage(raw, Descriptor(media_type, sha256_digest(raw), len(raw)),
                         store.read_blob, store.open_blob)


def push(store: Store, name: str, destination: str | Reference | None = None,
         options: RegistryOptions | None = None, *, compression: str | None = None,
         digestfile: str | None = None, progress: Progress | None = None) -> Descriptor:
    """Push the store's image ``name`` to ``destination`` (default: its own name)."""
    options = options or RegistryOptions()
    if isinstance(destination, Reference):
        dest = destination
    else:
        dest = parse_reference(destination or name)
    with store.writing():
        image = with_compression(store, store.image_for(store.resolve(name)), compression)
        if dest.digest is not None and dest.digest != image.digest:
            raise RegistryError(f"cannot push {name} as {dest}: the image's digest is "
                                f"{image.digest}")
        repo = RemoteRepository.for_reference(dest, options)
        try:
            sink = RemoteSink(repo, BlobInfoCache(store.root),
                              reopen=lambda d: open(  # noqa: SIM115 - the body closes it
                                  store.layout.blob_path(d.digest), "rb"))
            tags = [dest.tag] if dest.tag and dest.digest is None else []
            desc = copy_image(image, sink, tags=tags, progress=progress,
                              concurrency=options.concurrency)
            if desc.digest == image.digest:  # the image's own signatures travel with it
                from registry_client.signatures import push_signatures
                from store.signatures import LocalSignatures

                local = LocalSignatures(store).load(desc.digest)
                if local:
                    push_signatures(repo, desc.digest, local)
        finally:
            repo.transport.close()
    if digestfile:
        atomic_write(digestfile, desc.digest.encode(), durable=False)
    return desc


__all__ = ["RemoteSink", "push", "with_compression", "OCI_MANIFEST"]
