"""Hostile layouts and archives: a clear error, and nothing half-written in the store."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile

import pytest

from store.errors import KilnError
from store.store import Store
from store.transfer import load
from tests.conftest import tree_snapshot


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tar(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _blob(layout, data: bytes) -> str:
    d = _sha(data)
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / d[7:]).write_bytes(data)
    return d


def make_layout(path, *, layers=None, config_patch=None, manifest_patch=None,
                index_patch=None, tamper=None):
    """An OCI layout with one image; the patches make it hostile."""
    layers = layers if layers is not None else [_tar({"hello": b"hi\n"})]
    path.mkdir()
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    layer_descs = [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": _blob(path, data), "size": len(data)} for data in layers]
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [_sha(x) for x in layers]}}
    config.update(config_patch or {})
    cbytes = json.dumps(config).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": _blob(path, cbytes), "size": len(cbytes)},
                "layers": layer_descs}
    manifest.update(manifest_patch or {})
    mbytes = json.dumps(manifest).encode()
    entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             "digest": _blob(path, mbytes), "size": len(mbytes),
             "annotations": {"org.opencontainers.image.ref.name": "docker.io/library/evil:1"}}
    entry.update(index_patch or {})
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    if tamper:
        tamper(path, layer_descs)
    return path


@pytest.fixture
def guarded(tmp_path):
    """A store plus a snapshot of everything around it; asserts nothing leaked on exit."""
    store = Store(tmp_path / "root")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_text("precious")
    before_store = tree_snapshot(store.root)
    before_victim = tree_snapshot(victim)
    yield store
    assert tree_snapshot(victim) == before_victim
    def settled(snap):
        # lock files may appear and directory mtimes move (tmp/ stages come and go);
        # every other name, mode, owner and byte must be as it was
        return {k: (v[:4] if stat.S_ISDIR(v[0]) else v) for k, v in snap.items()
                if not k.startswith("locks")}

    assert settled(tree_snapshot(store.root)) == settled(before_store)


def _refused(store, path, match):
    with pytest.raises(KilnError, match=match):
        load(store, path)


def test_a_well_formed_layout_loads(tmp_path):
    store = Store(tmp_path / "root")
    assert load(store, make_layout(tmp_path / "ok")) == ["docker.io/library/evil:1"]


def test_manifest_over_4_mib(guarded, tmp_path):
    big = {"annotations": {"pad": "x" * (4 * 1024 * 1024)}}
    _refused(guarded, make_layout(tmp_path / "l", manifest_patch=big), "limit")


def test_manifest_with_layers_and_manifests(guarded, tmp_path):
    both = {"manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "digest": _sha(b"x"), "size": 1}]}
    _refused(guarded, make_layout(tmp_path / "l", manifest_patch=both), "manifests")


@pytest.mark.parametrize("digest", ["sha256:../../x", "sha256:" + "A" * 64,
                                    "sha256:" + "a" * 63])
def test_bad_digests_in_index(guarded, tmp_path, digest):
    _refused(guarded, make_layout(tmp_path / "l", index_patch={"digest": digest}),
             "invalid digest|digest")


def _rewrite_layer(fn):
    def tamper(path, descs):
        p = path / "blobs" / "sha256" / descs[0]["digest"][7:]
        p.write_bytes(fn(p.read_bytes()))
    return tamper


@pytest.mark.parametrize("name, fn, match", [
    ("flipped", lambda b: b[:-1] + bytes([b[-1] ^ 1]), "does not match"),
    ("short", lambda b: b[:-1], "size|bytes"),
    ("long", lambda b: b + b"\0", "size|longer"),
])
def test_layer_blob_not_matching_its_descriptor(guarded, tmp_path, name, fn, match):
    _refused(guarded, make_layout(tmp_path / "l", tamper=_rewrite_layer(fn)), match)


def test_wrong_diff_id(guarded, tmp_path):
    lie = {"rootfs": {"type": "layers", "diff_ids": [_sha(b"something else")]}}
    _refused(guarded, make_layout(tmp_path / "l", config_patch=lie), "diff_id|diff")


def test_hostile_layer_inside_a_layout(guarded, tmp_path):
    _refused(guarded, make_layout(tmp_path / "l", layers=[_tar({"../../victim/file": b"x"})]),
             r"\.\.")


def _docker_archive(path, manifest, members: dict[str, bytes], symlinks=None):
    with tarfile.open(path, "w") as t:
        for name, data in {**members, "manifest.json": json.dumps(manifest).encode()}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            t.addfile(info)
    return path


@pytest.mark.parametrize("layer_name, symlinks", [
    ("../../victim/file", None),
    ("/etc/passwd", None),
    ("missing.tar", None),
    ("link.tar", {"link.tar": "../../../etc/passwd"}),
    ("link.tar", {"link.tar": "/etc/passwd"}),
])
def test_docker_archive_pointing_outside(guarded, tmp_path, layer_name, symlinks):
    layer = _tar({"f": b"x"})
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [_sha(layer)]}}).encode()
    archive = _docker_archive(tmp_path / "a.tar",
                              [{"Config": "c.json", "RepoTags": ["evil:1"],
                                "Layers": [layer_name]}],
                              {"c.json": config, "good.tar": layer}, symlinks)
    _refused(guarded, archive, "outside|not in the archive|inside the archive|not a regular")


def test_docker_archive_config_pointing_outside(guarded, tmp_path):
    archive = _docker_archive(tmp_path / "a.tar",
                              [{"Config": "../../../etc/passwd", "Layers": []}], {})
    _refused(guarded, archive, "outside")


def test_oci_archive_with_foreign_members(guarded, tmp_path):
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as t:
        for name, data in {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
                           "../escape": b"x"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    _refused(guarded, path, "unexpected member")
    assert not (tmp_path.parent / "escape").exists()
    assert not os.path.exists(tmp_path / "escape")
