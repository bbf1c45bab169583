"""``kiln copy SRC DST``: one copy_image between any two places an image can live.

Places use skopeo's transport names: ``docker://REF``, ``oci:DIR[:TAG]``,
``oci-archive:FILE[:TAG]``, ``docker-archive:FILE[:REF]``, plus ``kiln:NAME``
for kiln's own store.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from registry_client.errors import RegistryError
from registry_client.transport import RegistryOptions
from store.documents import Descriptor
from store.errors import KilnError
from store.image import Image, Progress, copy_image
from store.reference import parse_reference
from store.store import Store, StoreSink

TRANSPORTS = ("docker", "oci", "oci-archive", "docker-archive", "kiln")


@dataclass(frozen=True)
class Location:
    transport: str
    path: str               # a reference (docker, kiln) or a file/dir path
    name: str | None = None  # oci tag or docker-archive reference


def parse_location(text: str) -> Location:
    if text.startswith("docker://"):
        return Location("docker", text[len("docker://"):])
    transport, sep, rest = text.partition(":")
    if not sep or transport not in TRANSPORTS or not rest:
        raise KilnError(f"{text!r}: name a transport: docker://REF, oci:DIR[:TAG], "
                        "oci-archive:FILE[:TAG], docker-archive:FILE[:REF] or kiln:NAME")
    if transport == "kiln":
        return Location("kiln", rest)
    path, _, name = rest.partition(":")
    return Location(transport, path, name or None)


@contextlib.contextmanager
def open_source(loc: Location, store: Store, options: RegistryOptions,
                platform: dict | None) -> Iterator[Image]:
    if loc.transport == "docker":
        from registry_client.pull import open_remote_image

        remote = open_remote_image(loc.path, options, platform=platform)
        try:
            remote.image.layers()
            yield remote.image
        finally:
            remote.close()
    elif loc.transport == "kiln":
        yield store.image_for(store.resolve(loc.path), platform=platform)
    elif loc.transport in ("oci", "oci-archive"):
        from store.fsutil import remove_tree
        from store.oci_dir import LayoutSource, unpack_oci_archive

        work = None
        try:
            path = loc.path
            if loc.transport == "oci-archive":
                work = store.mkdtemp("copy-")
                unpack_oci_archive(loc.path, work)
                path = work
            source = LayoutSource(path)
            yield source.image(source.find(loc.name), platform)
        finally:
            if work is not None:
                remove_tree(work)
    else:
        from store.docker_archive import DockerArchive

        archive = DockerArchive(loc.path)
        try:
            images = archive.images
            if loc.name is not None:
                want = str(parse_reference(loc.name))
                images = [i for i in images
                          if want in (str(parse_reference(t)) for t in i.repo_tags)]
            if len(images) != 1:
                raise KilnError(f"docker-archive {loc.path}: {len(images)} images match; "
                                "name one as docker-archive:FILE:REF")
            yield images[0]
        finally:
            archive.close()


def copy(store: Store, source: str, destination: str, *,
         src_options: RegistryOptions | None = None, dst_options: RegistryOptions | None = None,
         compression: str | None = None, platform: dict | None = None,
         progress: Progress | None = None, digestfile: str | None = None) -> Descriptor:
    src, dst = parse_location(source), parse_location(destination)
    src_options = src_options or RegistryOptions()
    dst_options = dst_options or RegistryOptions()
    with store.writing(), open_source(src, store, src_options, platform) as image:
        desc = _copy_to(image, dst, store, dst_options, compression, progress)
    if digestfile:
        from store.fsutil import atomic_write

        atomic_write(digestfile, desc.digest.encode(), durable=False)
    return desc


def _copy_to(image: Image, dst: Location, store: Store, options: RegistryOptions,
             compression: str | None, progress: Progress | None) -> Descriptor:
    if dst.transport == "docker":
        from registry_client.push import RemoteSink
        from registry_client.remote import RemoteRepository
        from store.blobinfo import BlobInfoCache

        ref = parse_reference(dst.path)
        if ref.digest is not None:
            raise RegistryError(f"cannot copy to a digest reference {dst.path!r}; name a tag")
        repo = RemoteRepository.for_reference(ref, options)
        try:
            return copy_image(image, RemoteSink(repo, BlobInfoCache(store.root)),
                              tags=[ref.tag or "latest"], compression=compression,
                              progress=progress, tmp_dir=str(store.tmp),
                              concurrency=options.concurrency)
        finally:
            repo.transport.close()
    if dst.transport == "kiln":
        ref = parse_reference(dst.path)
        with StoreSink(store) as sink:
            return copy_image(image, sink, tags=[str(ref)], compression=compression,
                              progress=progress,
                              tmp_dir=str(store.tmp), concurrency=options.concurrency)
    from store.transfer import save_images

    if dst.transport == "docker-archive":
        tags = [str(parse_reference(dst.name))] if dst.name else []
    else:
        tags = [dst.name] if dst.name else []
    return save_images(store, [(image, tags)], dst.path, fmt=dst.transport,
                       compression=compression, progress=progress,
                       concurrency=options.concurrency)[0]
