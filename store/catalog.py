"""What ``kiln images``, ``inspect``, ``history`` and ``rmi`` show and do, as library calls."""

from __future__ import annotations

from dataclasses import dataclass, field

from store.digest import digest_hex
from store.documents import Descriptor
from store.errors import NotFoundError, ReferenceError_, StoreError
from store.reference import parse_reference
from store.store import Store


@dataclass
class ImageSummary:
    id: str  # config digest hex, as podman shows image IDs
    digest: str  # manifest digest
    names: list[str] = field(default_factory=list)
    created: str = ""
    size: int = 0
    labels: dict = field(default_factory=dict)


def _summary(store: Store, desc: Descriptor) -> ImageSummary:
    image = store.image_for(desc)
    config_desc = image.config_descriptor()
    config = image.config()
    size = config_desc.size + sum(la.size for la in image.layers())
    labels = (config.get("config") or {}).get("Labels") or {}
    return ImageSummary(digest_hex(config_desc.digest), image.digest, [],
                        config.get("created", ""), size, dict(labels))


def list_images(store: Store) -> list[ImageSummary]:
    """One summary per distinct image, with all its tags, in the order of index.json; an
    image without a name (a build without -t) has no names: ``<none>`` in the table."""
    by_digest: dict[str, ImageSummary] = {}
    from store.layout import REF_NAME
    from store.signatures import is_signature_name

    for entry in store.layout.read_index():
        name = (entry.annotations or {}).get(REF_NAME)
        if name is not None and is_signature_name(name):  # cosign's: shown by `kiln verify`
            continue
        s = by_digest.get(entry.digest)
        if s is None:
            try:
                s = by_digest[entry.digest] = _summary(store, entry)
            except NotFoundError as e:  # a store damaged by a kiln before the tag checks
                shown = name or entry.digest
                raise StoreError(f"image {shown} is damaged: {e}; remove it with "
                                 f"`kiln rmi {shown}` and pull or build it again") from None
        if name is not None:
            s.names.append(name)
    return list(by_digest.values())


def inspect_image(store: Store, name: str) -> dict:
    desc = store.resolve(name)
    image = store.image_for(desc)
    config = image.config()
    config_desc = image.config_descriptor()
    layers = image.layers()
    return {
        "Id": digest_hex(config_desc.digest),
        "Digest": image.digest,
        "RepoTags": store.names_of(desc.digest),
        "Created": config.get("created"),
        "Architecture": config.get("architecture"),
        "Os": config.get("os"),
        "Variant": config.get("variant"),
        "Author": config.get("author"),
        "Config": config.get("config", {}),
        "RootFS": config.get("rootfs"),
        "History": config.get("history", []),
        "Layers": [{"Digest": la.digest, "DiffID": la.diff_id, "MediaType": la.media_type,
                    "Size": la.size} for la in layers],
        "Size": config_desc.size + sum(la.size for la in layers),
        "ManifestMediaType": image.media_type,
        "Annotations": image.manifest().get("annotations", {}),
    }


def history(store: Store, name: str) -> list[dict]:
    """History entries newest first, each with the layer it made (None for metadata steps)."""
    image = store.image(name)
    layers = iter(image.layers())
    rows = []
    for entry in image.config().get("history", []):
        layer = None if entry.get("empty_layer") else next(layers, None)
        rows.append({"created": entry.get("created", ""),
                     "created_by": entry.get("created_by", ""),
                     "comment": entry.get("comment", ""),
                     "size": layer.size if layer else 0,
                     "layer": layer.digest if layer else None})
    return list(reversed(rows))


def remove_image(store: Store, name: str, *, force: bool = False) -> tuple[list[str], bool]:
    """Untag ``name`` (all tags when named by ID); returns (untagged names, image deleted?)."""
    from store.gc import prune

    with store.writing():
        desc = store.resolve(name)
        tags = store.names_of(desc.digest)
        try:
            ref = parse_reference(name)
            targets = [str(ref)] if str(ref) in tags else tags
        except ReferenceError_:
            targets = tags
        if len(targets) > 1 and not force and targets == tags and name not in tags:
            raise StoreError(f"image {name} has several names ({', '.join(tags)}); "
                             "remove them one by one or use -f")
        last = set(targets) == set(tags)
        users = store.containers_using(desc.digest)
        if last and users and not force:
            raise StoreError(f"image {name} is in use by container(s) {', '.join(users)}; "
                             "remove them first or use -f")
        for t in targets:
            try:
                store.layout.remove_tag(t)
            except NotFoundError:
                pass
        if last:
            store.layout.remove_untagged(desc.digest)
    deleted = last and not store.containers_using(desc.digest)
    if deleted:
        prune(store)
    return targets, deleted
