"""--cache-to and --cache-from: the build cache to and from a registry or a directory.

Spelled as buildx spells them: ``type=registry,ref=REG/REPO:TAG[,mode=min|max]``,
``type=local,dest=DIR`` (to) and ``type=local,src=DIR`` (from), ``[,tag=TAG]`` for a
directory (default latest), and a bare ``REG/REPO:TAG`` for type=registry. mode=min (the
default, as buildx) exports the steps of the image's own stage chain, mode=max those of
every stage built and the contents of the shared RUN --mount=type=cache directories its
RUN steps name (BuildKit cannot, moby/buildkit#1512): a fresh runner's new cache dir of
that id starts from them. ``ignore-error=true`` turns a failed export into a warning. A cache
that is not there yet is a warning, not an error: the first build of a pipeline writes it.

``--cache-to type=inline`` puts the cache of the image's own steps into its config (as
BuildKit's inline cache), and ``--cache-from REF`` of such an image, pushed as usual,
takes steps from it with the image's layers. Classic builders matched an image's history
instead; kiln does not: a history entry of COPY does not say what was copied.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from builder.cache_transfer import (
    CACHE_CONFIG,
    CacheImage,
    CacheSource,
    CacheTransferError,
    parse_document,
    parse_mounts,
)
from registry_client.errors import NotFoundOnRegistry, RegistryError
from registry_client.transport import RegistryOptions
from store.documents import OCI_MANIFEST, Descriptor
from store.errors import KilnError, NotFoundError, StoreError
from store.reference import parse_reference
from store.store import Store

# buildx keys kiln accepts and has nothing to do for (its layers keep their compression)
_IGNORED = {"compression", "compression-level", "force-compression", "oci-mediatypes",
            "image-manifest"}


@dataclass(frozen=True)
class CacheSpec:
    kind: str  # "registry", "local" or "inline"
    location: str  # a reference, or a directory
    tag: str = "latest"  # local only
    mode: str = "min"
    ignore_error: bool = False
    text: str = ""


def parse_cache_spec(flag: str, given: str, values: dict[str, str]) -> CacheSpec:
    """A --cache-to/--cache-from spec: ``values`` are its key=value pairs, ``type`` among
    them (the CLI splits them, as for --output and --secret; a bare reference is
    ``type=registry,ref=REF``)."""
    values = dict(values)
    kind = values.pop("type")
    location, tag = "", "latest"
    if kind != "inline" or flag != "--cache-to":
        where = {"registry": "ref", "local": "dest" if flag == "--cache-to" else "src"}.get(kind)
        if where is None:
            kinds = "registry, local or inline" if flag == "--cache-to" else "registry or local"
            raise KilnError(f"{flag} {given!r}: type must be {kinds} (kiln has no {kind!r} "
                            "cache)")
        location = values.pop(where, None)
        if not location:
            raise KilnError(f"{flag} {given!r}: {where}= is missing")
        if kind == "registry":
            location = str(parse_reference(location))
        else:
            tag = values.pop("tag", "latest")
    mode = values.pop("mode", "min")
    if mode not in ("min", "max") or (mode != "min" and flag != "--cache-to"):
        raise KilnError(f"{flag} {given!r}: mode must be min or max (of --cache-to)")
    # an inline cache is part of the image: nothing to ignore failing
    ignore = values.pop("ignore-error", "false").lower() if kind != "inline" else "false"
    if ignore not in ("true", "false"):
        raise KilnError(f"{flag} {given!r}: ignore-error must be true or false")
    unknown = set(values) - _IGNORED
    if unknown:
        raise KilnError(f"{flag} {given!r}: unknown key(s) {', '.join(sorted(unknown))}")
    return CacheSpec(kind, location, tag, mode, ignore == "true", given)


def export_cache(store: Store, spec: CacheSpec, target_chains: list[list[str]],
                 all_chains: list[list[str]], options: RegistryOptions, *,
                 mounts: list[str] = ()) -> tuple[Descriptor, CacheImage]:
    """Write the cache of ``spec.mode``'s stages where ``spec`` says (mode=max: with the
    contents of the RUN --mount=type=cache dirs named by ``mounts``); blobs the
    destination has already are not sent again."""
    from builder.cache_transfer import mount_layers
    from store.image import copy_image

    if spec.mode == "max":
        image = CacheImage(store, all_chains, mounts=mount_layers(store, mounts))
    else:
        image = CacheImage(store, target_chains)
    if spec.kind == "local":
        from store.oci_dir import LayoutSink

        return copy_image(image, LayoutSink(spec.location), tags=[spec.tag]), image
    from registry_client.push import RemoteSink
    from registry_client.remote import RemoteRepository
    from store.blobinfo import BlobInfoCache

    ref = parse_reference(spec.location)
    repo = RemoteRepository.for_reference(ref, options)
    try:
        desc = copy_image(image, RemoteSink(repo, BlobInfoCache(store.root)),
                          tags=[ref.tag or "latest"], concurrency=options.concurrency)
    finally:
        repo.transport.close()
    return desc, image


class Imported:
    """The caches a build reads (--cache-from), opened for its length."""

    def __init__(self, store: Store, warn=None):
        self._warn = warn or (lambda text: sys.stderr.write(f"kiln: warning: {text}\n"))
        self.source = CacheSource(store, warn=self._warn)
        self._repos: list = []

    def add(self, spec: CacheSpec, options: RegistryOptions) -> int:
        """Read the cache ``spec`` names; the number of records it has."""
        if spec.kind == "local":
            return self._add_local(spec)
        from registry_client.remote import RemoteRepository

        ref = parse_reference(spec.location)
        repo = RemoteRepository.for_reference(ref, options)
        self._repos.append(repo)
        try:
            manifest = repo.get_manifest(ref.digest or ref.tag or "latest")
        except NotFoundOnRegistry:
            self._warn(f"--cache-from {spec.location}: no cache there yet")
            return 0
        except RegistryError as e:  # unreachable, refused: the build goes on without it
            self._warn(f"--cache-from {spec.location}: cannot read the cache: {e}")
            return 0
        where = f"{spec.location} ({manifest.descriptor.digest})"
        config = None if manifest.is_index else _manifest_config(manifest.raw, where)
        if config is None or config.media_type != CACHE_CONFIG:
            return self._add_image(spec, options, repo, manifest)
        return self._take(repo.read_blob(config.digest, config.size), where, repo.open_blob)

    def _add_image(self, spec: CacheSpec, options: RegistryOptions, repo, manifest) -> int:
        """--cache-from IMAGE: the cache an image built with --cache-to type=inline holds in
        its config, with the image's own layers."""
        from builder.cache import INLINE_KEY
        from registry_client.pull import open_remote_image

        image = open_remote_image(spec.location, options, repo=repo, top=manifest).image
        where = f"{spec.location} ({image.digest})"
        doc = image.config().get(INLINE_KEY)
        if doc is None:
            self._warn(f"--cache-from {spec.location}: the image holds no build cache (build "
                       "it with --cache-to type=inline)")
            return 0
        records, chains = parse_document(doc, where)
        layers = {la.digest for la in image.layers()}
        foreign = [k for k, r in records.items() if r["layer"] and r["layer"]["digest"]
                   not in layers]
        if foreign:
            raise CacheTransferError(f"cache {where}: record {foreign[0][:12]} names a layer "
                                     "the image does not have")
        self.source.add(records, repo.open_blob, chains)
        return len(records)

    def _add_local(self, spec: CacheSpec) -> int:
        from store.oci_dir import LayoutSource

        try:
            layout = LayoutSource(spec.location)
            entry = layout.find(spec.tag)
        except (NotFoundError, StoreError, OSError) as e:
            self._warn(f"--cache-from {spec.location}: no cache there ({e})")
            return 0
        where = f"{spec.location}:{spec.tag} ({entry.digest})"
        config = _manifest_config(layout.layout.read_blob(entry.digest, entry.size), where)
        if entry.media_type not in (OCI_MANIFEST, "") or config.media_type != CACHE_CONFIG:
            raise CacheTransferError(f"cache {where}: not a kiln build cache (its config is "
                                     f"{config.media_type}, not {CACHE_CONFIG})")
        return self._take(layout.layout.read_blob(config.digest, config.size), where,
                          layout.layout.open_blob)

    def _take(self, raw_config: bytes, where: str, open_blob) -> int:
        """The records, chains and cache mounts of a cache config, to the source."""
        records, chains = parse_document(raw_config, where)
        self.source.add(records, open_blob, chains, parse_mounts(raw_config, where))
        return len(records)

    def close(self) -> None:
        self.source.close()
        for repo in self._repos:
            repo.transport.close()
        self._repos = []


def _manifest_config(raw: bytes, where: str) -> Descriptor:
    """The config descriptor of a cache's (or an image's) manifest."""
    import json

    try:
        return Descriptor.from_json(json.loads(raw)["config"], where="cache manifest config")
    except (ValueError, KeyError, TypeError, KilnError) as e:
        raise CacheTransferError(f"cache {where}: not an image manifest: {e}") from None
