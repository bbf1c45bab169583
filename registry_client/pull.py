"""Images from a registry: resolve a reference to one image, and pull it into the store.

A pull leaves the image ready to run: each missing layer is streamed once,
written to the store's staging area and unpacked in the same pass (its digest
and diff_id checked as the bytes go by); nothing is committed unless every
piece checked out.
"""

from __future__ import annotations

from dataclasses import dataclass

from registry_client.errors import RegistryError
from registry_client.remote import Manifest, RemoteRepository
from registry_client.transport import RegistryOptions
from store.documents import Descriptor, parse_index
from store.errors import LayerError, ManifestError
from store.image import ManifestImage, Progress, copy_image
from store.reference import Reference, parse_reference
from store.store import Store, StoreSink, host_platform, pick_platform


@dataclass
class RemoteImage:
    """An image on a registry, resolved to one platform."""

    reference: Reference
    repository: RemoteRepository
    manifest: Manifest           # the image manifest
    top: Manifest                # what the reference named: the manifest, or its index
    image: ManifestImage

    def close(self) -> None:
        self.repository.transport.close()


def parse_platform(text: str | None) -> dict | None:
    """``os/arch[/variant]`` as --platform takes it."""
    if not text:
        return None
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise RegistryError(f"invalid platform {text!r} (want os/arch[/variant])")
    out = {"os": parts[0], "architecture": parts[1]}
    if len(parts) == 3:
        out["variant"] = parts[2]
    return out


def open_remote_image(reference: str | Reference, options: RegistryOptions | None = None, *,
                      platform: dict | None = None, repo: RemoteRepository | None = None,
                      top: Manifest | None = None) -> RemoteImage:
    """``repo`` and ``top``: the repository and what the reference named, when the caller
    has fetched that already."""
    ref = parse_reference(reference) if isinstance(reference, str) else reference
    repo = repo or RemoteRepository.for_reference(ref, options)
    try:
        top = top or repo.get_manifest(ref.digest or ref.tag or "latest")
        manifest = top
        if top.is_index:
            index = parse_index(top.raw, media_type=top.descriptor.media_type)
            child = pick_platform(index, platform or host_platform(), where=str(ref))
            manifest = repo.get_manifest(child.digest)
            if manifest.is_index:
                raise RegistryError("an index inside an index is not an image", digest=child.digest)
        image = repo.image(manifest)
        try:
            image.config()
        except ManifestError as e:  # fetched and checked by digest, but not a valid config
            config = image.config_descriptor().digest
            raise RegistryError(f"invalid image config: {e}", url=repo.blob_url(config),
                                digest=config) from None
        return RemoteImage(ref, repo, manifest, top, image)
    except BaseException:
        repo.transport.close()
        raise


def pull(store: Store, reference: str | Reference, options: RegistryOptions | None = None, *,
         platform: dict | None = None, progress: Progress | None = None,
         on_resolved=None, requirements: list | None = None) -> Descriptor:
    """Pull ``reference`` into ``store`` (layers unpacked); returns the stored manifest's
    descriptor. The name is tagged as given (``name@digest`` pins are kept as such).

    ``requirements`` (registry_client.trust) are checked before any layer is fetched;
    the signatures that satisfied them are kept in the store beside the image."""
    options = options or RegistryOptions()
    remote = open_remote_image(reference, options, platform=platform)
    try:
        image = remote.image
        image.layers()  # fetches and checks the config: its diff_ids must match the manifest
        fetched: dict[str, list] = {}
        if requirements:
            from registry_client.signatures import fetch_signatures
            from registry_client.trust import check

            def signatures_for(digest: str) -> list:
                fetched[digest] = fetch_signatures(remote.repository, digest)
                return fetched[digest]

            check(requirements, str(remote.reference),
                  [remote.top.descriptor.digest, remote.manifest.descriptor.digest],
                  signatures_for)
        if on_resolved is not None:
            on_resolved(remote)
        # The store lock is held from the first blob staged to the tag (and the signatures
        # kept beside it): a prune meanwhile would take the blobs of an image not yet named.
        with store.writing():
            with StoreSink(store) as sink:
                try:
                    desc = copy_image(image, sink, progress=progress,
                                      concurrency=options.concurrency, tmp_dir=str(store.tmp))
                except LayerError as e:  # a hostile layer: say where it came from
                    raise _pulled_from(e, remote) from None
            ref = remote.reference
            if ref.digest is None:
                store.tag(str(ref), desc)
            else:
                store.pin(str(ref), desc)  # found again by the digest asked for
            remember_locations(store, remote.repository, image)
            if any(fetched.values()):
                from store.signatures import LocalSignatures

                for digest, sigs in fetched.items():
                    if sigs:
                        LocalSignatures(store).add(remote.reference.name, digest, sigs)
        return desc
    finally:
        remote.close()


def _pulled_from(e: LayerError, remote: RemoteImage) -> LayerError:
    where = f"pulling {remote.reference}"
    if e.layer:
        where += " from " + remote.repository.blob_url(e.layer)
    err = LayerError(f"{e}; {where}")
    err.layer, err.entry = e.layer, e.entry
    return err


def remember_locations(store: Store, repo: RemoteRepository, image) -> None:
    from store.blobinfo import BlobInfoCache

    cache = BlobInfoCache(store.root)
    registry = repo.transport.registry
    for layer in image.layers():
        cache.add_location(layer.digest, registry, repo.repository)
