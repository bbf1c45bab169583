"""``kiln import``: a root filesystem directory or tarball becomes a one-layer base image."""

from __future__ import annotations

import os
import time
from pathlib import Path

from store.documents import OCI_CONFIG, OCI_MANIFEST, Descriptor, canonical_json
from store.errors import KilnError, StoreError
from store.fsutil import remove_tree
from store.store import Store, host_platform

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(ts)))


def source_date_epoch() -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None or value == "":
        return None
    try:
        epoch = int(value)
    except ValueError:
        raise KilnError(f"SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds") from None
    if epoch < 0:
        raise KilnError(f"SOURCE_DATE_EPOCH={value!r} is negative")
    return epoch


def import_rootfs(store: Store, source: str | os.PathLike, name: str, *,
                  compression: str = "zstd", epoch: int | None = None) -> Descriptor:
    """Import a directory or a (possibly compressed) tarball as ``name``; returns the manifest."""
    from store.layer_extract import extract_layer
    from store.layer_writer import write_layer

    src = Path(source)
    if not src.exists():
        raise StoreError(f"cannot import {src}: no such file or directory")
    epoch = source_date_epoch() if epoch is None else epoch
    with store.writing():
        work = Path(store.mkdtemp("import-"))
        try:
            if src.is_dir():
                tree = src
            else:
                tree = work / "diff"
                with open(src, "rb") as f:
                    extract_layer(f, _sniffed_media_type(src), tree, expected_diff_id=None,
                                  layer_digest=str(src))
            blob_path = work / "layer.blob"
            with open(blob_path, "wb") as out:
                blob = write_layer(tree, out, compression=compression, source_date_epoch=epoch)
                out.flush()
                os.fsync(out.fileno())
            store.layout.install_file(blob_path, blob.digest)
            if tree != src:
                store.adopt_layer_dir(tree, blob.diff_id)
            layer_desc = Descriptor(blob.media_type, blob.digest, blob.size)
            created = rfc3339(epoch if epoch is not None else time.time())
            config = {
                **host_platform(),
                "created": created,
                "config": {"Env": [DEFAULT_PATH]},
                "rootfs": {"type": "layers", "diff_ids": [blob.diff_id]},
                "history": [{"created": created, "created_by": f"kiln import {src.name}"}],
            }
            config_desc = store.put_bytes(canonical_json(config), OCI_CONFIG)
            manifest = {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config_desc.to_json(),
                "layers": [layer_desc.to_json()],
            }
            manifest_desc = store.put_bytes(canonical_json(manifest), OCI_MANIFEST)
            image = store.image_for(manifest_desc)
            store.unpack_image(image)
            store.tag(name, manifest_desc)
            return manifest_desc
        finally:
            remove_tree(work)


def _sniffed_media_type(path: Path) -> str:
    from store.compression import OCI_LAYER_FOR, sniff_compression

    with open(path, "rb") as f:
        return OCI_LAYER_FOR[sniff_compression(f.read(4))]
