"""A tag only ever names an image whose blobs are all in the store."""

import json
import os

import pytest

from store.documents import OCI_INDEX, OCI_MANIFEST, Descriptor, canonical_json
from store.errors import StoreError
from store.importer import import_rootfs
from tests.conftest import KilnCLI


def _tree(tmp_path, name, content):
    d = tmp_path / name
    d.mkdir()
    (d / "file").write_text(content)
    return d


def _drop_blob(store, digest):
    os.unlink(store.layout.blob_path(digest))


def test_tagging_a_manifest_whose_layer_is_missing_is_refused(busybox_store, tmp_path):
    store = busybox_store
    desc = import_rootfs(store, _tree(tmp_path, "app", "a"), "app:1", epoch=0)
    layer = store.image_for(desc).layers()[0]
    store.untag("app:1")
    _drop_blob(store, layer.digest)  # as a prune that ran before the tag would have
    index_before = (store.root / "index.json").read_bytes()
    with pytest.raises(StoreError, match=f"layer {layer.digest} of manifest {desc.digest}"):
        store.tag("app:1", desc)
    assert (store.root / "index.json").read_bytes() == index_before
    assert os.listdir(store.tmp) == []


def test_tagging_a_manifest_whose_config_or_itself_is_missing_is_refused(busybox_store,
                                                                         tmp_path):
    store = busybox_store
    desc = import_rootfs(store, _tree(tmp_path, "app", "a"), "app:1", epoch=0)
    config = store.image_for(desc).config_descriptor()
    _drop_blob(store, config.digest)
    with pytest.raises(StoreError, match=f"config {config.digest}"):
        store.tag("app:2", desc)
    _drop_blob(store, desc.digest)
    with pytest.raises(StoreError, match=f"image {desc.digest} is not in"):
        store.tag("app:3", desc)
    assert [t.name for t in store.tags()] == ["docker.io/library/busybox:latest",
                                              "docker.io/library/app:1"]


def test_tagging_an_index_needs_its_manifests_and_their_blobs(busybox_store, tmp_path):
    store = busybox_store
    busybox = store.resolve("busybox")
    other = import_rootfs(store, _tree(tmp_path, "other", "o"), "other:1", epoch=0)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
             "manifests": [{**d.to_json(), "platform": {"os": "linux", "architecture": a}}
                           for d, a in ((busybox, "amd64"), (other, "arm64"))]}
    index_desc = store.put_bytes(canonical_json(index), OCI_INDEX)
    store.tag("multi:1", index_desc)  # whole: fine
    layer = store.image_for(other).layers()[0]
    store.untag("other:1")
    _drop_blob(store, layer.digest)
    with pytest.raises(StoreError, match=f"layer {layer.digest} of manifest {other.digest}"):
        store.tag("multi:2", index_desc)
    assert "docker.io/library/multi:2" not in {t.name for t in store.tags()}


def test_tagging_something_that_is_not_a_manifest_is_refused(busybox_store):
    store = busybox_store
    config = store.image("busybox").config_descriptor()
    with pytest.raises(StoreError, match="not an image manifest"):
        store.tag("odd:1", Descriptor(OCI_MANIFEST, config.digest, config.size))


def test_kiln_tag_of_an_image_with_a_missing_layer_says_which(busybox_rootfs, tmp_path):
    kiln = KilnCLI(tmp_path / "root")
    kiln("import", str(busybox_rootfs), "busybox")
    index = tmp_path / "root" / "index.json"
    manifest = json.loads((tmp_path / "root" / "blobs" / "sha256" / json.loads(
        index.read_bytes())["manifests"][0]["digest"][7:]).read_bytes())
    layer = manifest["layers"][0]["digest"]
    os.unlink(tmp_path / "root" / "blobs" / "sha256" / layer[7:])
    before = index.read_bytes()
    p = kiln("tag", "busybox", "again:1", check=False)
    assert p.returncode == 125
    assert p.err.startswith("kiln: error: cannot tag docker.io/library/again:1: the layer "
                            f"{layer} of manifest"), p.err
    assert "Traceback" not in p.err
    assert index.read_bytes() == before


def test_a_damaged_tag_is_named_by_kiln_images_and_rmi_clears_it(busybox_rootfs, tmp_path):
    """A store where an older kiln's prune took the blobs of a tagged image: `kiln images`
    says which tag and what to do, and `kiln rmi` of it brings the store back."""
    kiln = KilnCLI(tmp_path / "root")
    kiln("import", str(busybox_rootfs), "busybox")
    tree = _tree(tmp_path, "app", "a")
    kiln("import", str(tree), "app:1")
    blobs = tmp_path / "root" / "blobs" / "sha256"
    entry = json.loads((tmp_path / "root" / "index.json").read_bytes())["manifests"][1]
    manifest = json.loads((blobs / entry["digest"][7:]).read_bytes())
    config, layer = manifest["config"]["digest"], manifest["layers"][0]["digest"]
    os.unlink(blobs / config[7:])
    os.unlink(blobs / layer[7:])
    p = kiln("images", check=False)
    assert p.returncode == 125
    assert p.err.startswith("kiln: error: image docker.io/library/app:1 is damaged: blob "
                            f"{config} is not in"), p.err
    assert "kiln rmi docker.io/library/app:1" in p.err
    kiln("rmi", "app:1")
    assert "busybox" in kiln("images").out
