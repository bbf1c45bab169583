import io
import json
import os

from store.gc import prune
from store.importer import import_rootfs
from tests.store.fsck import check_store


def _blobs(store):
    return set(p.name for p in (store.root / "blobs/sha256").iterdir())


def _tree(tmp_path, name, content):
    d = tmp_path / name
    d.mkdir()
    (d / "file").write_text(content)
    return d


def test_prune_keeps_everything_reachable(busybox_store, tmp_path):
    store = busybox_store
    before = _blobs(store)
    layers = set(p.name for p in store.layers_dir.iterdir())
    r = prune(store)
    assert (r.blobs, r.layers) == (0, 0)
    assert _blobs(store) == before
    assert set(p.name for p in store.layers_dir.iterdir()) == layers
    assert check_store(store) == 1


def test_prune_removes_unreachable_blobs_layers_and_tmp(busybox_store, tmp_path):
    store = busybox_store
    keep = _blobs(store)
    import_rootfs(store, _tree(tmp_path, "other", "x"), "other:1", epoch=0)
    other_layers = {la.diff_id for la in store.image("other:1").layers()}
    store.put_blob(io.BytesIO(b"orphan"), "application/octet-stream")
    (store.tmp / "leftover-from-a-crash").write_text("junk")
    store.untag("other:1")
    r = prune(store)
    assert r.blobs == 4  # other's layer, config, manifest + the orphan
    assert r.layers == 1 and r.tmp == 1
    assert _blobs(store) == keep
    assert not any(store.has_layer_dir(d) for d in other_layers)
    assert check_store(store) == 1


def test_containers_and_cache_records_are_roots(busybox_store, tmp_path):
    store = busybox_store
    img = import_rootfs(store, _tree(tmp_path, "ctr", "c"), "ctr:1", epoch=0)
    cached = import_rootfs(store, _tree(tmp_path, "cached", "k"), "cached:1", epoch=0)
    cached_image = store.image_for(cached)
    cached_layer = cached_image.layers()[0]
    (store.containers_dir / "abc123").mkdir()
    (store.containers_dir / "abc123" / "state.json").write_text(json.dumps({"image": img.digest}))
    (store.cache_dir / "key1.json").write_text(json.dumps(
        {"blobs": [cached_layer.digest], "diff_ids": [cached_layer.diff_id]}))
    store.untag("ctr:1")
    store.untag("cached:1")
    prune(store)
    image = store.image_for(img)  # still whole: a container uses it
    assert store.has_layer_dir(image.layers()[0].diff_id)
    assert store.has_blob(cached_layer.digest) and store.has_layer_dir(cached_layer.diff_id)
    assert not store.has_blob(cached.digest)  # the cache keeps the layer, not the manifest


def test_prune_removes_what_a_killed_writer_left_outside_tmp(busybox_store):
    """With the store lock held exclusive no writer is midway: a temp file of an atomic
    write in cache/, or a container dir whose state.json was never written (kiln run makes
    both under the lock), belongs to a process that died, and nothing else would ever
    remove it."""
    store = busybox_store
    (store.cache_dir / "context").mkdir()
    (store.cache_dir / "context" / "ab.json").write_text("{}")
    (store.cache_dir / "context" / ".ab.json.x1y2.tmp").write_text("{half")
    (store.cache_dir / "blobinfo").mkdir()
    (store.cache_dir / "blobinfo" / ".tmp-cd.json-q9").write_text("{half")
    (store.containers_dir / "dead0123").mkdir()
    (store.containers_dir / "dead0123" / "upper").mkdir()
    (store.containers_dir / "live4567").mkdir()
    image = store.resolve("busybox").digest
    (store.containers_dir / "live4567" / "state.json").write_text(json.dumps({"image": image}))
    (store.containers_dir / ".cache").mkdir()
    r = prune(store)
    assert r.tmp == 1  # the container dir
    assert sorted(os.listdir(store.cache_dir / "context")) == ["ab.json"]
    assert os.listdir(store.cache_dir / "blobinfo") == []
    assert sorted(os.listdir(store.containers_dir)) == [".cache", "live4567"]
    assert check_store(store) == 1


def test_a_cache_record_of_a_long_run_line_is_a_root_too(busybox_store, tmp_path):
    """A RUN line of more than 1 MiB (words up to 1 MiB each) makes a record that size: prune
    used to read only its first MiB, found no JSON, and dropped the step's layer."""
    store = busybox_store
    cached = import_rootfs(store, _tree(tmp_path, "cached", "k"), "cached:1", epoch=0)
    layer = store.image_for(cached).layers()[0]
    (store.cache_dir / "long.json").write_text(json.dumps(
        {"history": [{"created_by": "RUN echo " + "x" * (3 << 20)}],
         "blobs": [layer.digest], "diff_ids": [layer.diff_id]}))
    store.untag("cached:1")
    prune(store)
    assert store.has_blob(layer.digest) and store.has_layer_dir(layer.diff_id)


def test_untagged_images_are_roots_until_pruned_as_dangling(busybox_store, tmp_path):
    """An image kept without a name (kiln build without -t) is an index.json entry with no
    ref name: found by ID, kept by a plain prune (rmi runs one), removed by a prune of
    dangling images unless a container uses it, and no longer nameless once tagged."""
    store = busybox_store
    kept = import_rootfs(store, _tree(tmp_path, "a", "a"), "a:1", epoch=0)
    used = import_rootfs(store, _tree(tmp_path, "b", "b"), "b:1", epoch=0)
    for name, desc in (("a:1", kept), ("b:1", used)):
        store.untag(name)
        store.keep_untagged(desc)
        store.keep_untagged(desc)  # once only
    assert [d.digest for d in store.untagged()] == [kept.digest, used.digest]
    image_id = store.image_for(kept).config_descriptor().digest
    assert store.resolve(image_id[7:19]).digest == kept.digest
    prune(store)
    assert store.has_blob(kept.digest) and store.has_blob(used.digest)
    (store.containers_dir / "c1").mkdir()
    (store.containers_dir / "c1" / "state.json").write_text(json.dumps({"image": used.digest}))
    store.tag("named:1", store.resolve(image_id[7:19]))
    assert [d.digest for d in store.untagged()] == [used.digest]
    store.untag("named:1")
    store.keep_untagged(kept)
    r = prune(store, dangling=True)
    assert r.dangling == 1 and not store.has_blob(kept.digest)
    assert [d.digest for d in store.untagged()] == [used.digest]  # a container uses it
    assert store.has_blob(used.digest)
    assert check_store(store) == 1
