"""Layer dirs: one per diff_id, shared, overlay-format, and usable as real overlay lowerdirs."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile

import pytest

from store.importer import import_rootfs
from store.transfer import load
from tests.store.test_hostile_images import make_layout


def _tar(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_one_layer_dir_per_diff_id_shared_by_images(store, busybox_rootfs):
    a = store.image_for(import_rootfs(store, busybox_rootfs, "a", epoch=0))
    layer_dir = store.layer_dir(a.layers()[0].diff_id)
    inode = os.stat(layer_dir).st_ino
    b = store.image_for(import_rootfs(store, busybox_rootfs, "b", epoch=0))
    assert a.layers()[0].diff_id == b.layers()[0].diff_id
    assert os.listdir(store.layers_dir) == [layer_dir.parent.name]
    assert os.stat(layer_dir).st_ino == inode  # not extracted a second time
    assert store.ensure_layer_dir(b.layers()[0]) == layer_dir


@pytest.fixture
def two_layer_image(store, tmp_path):
    lower = _tar([("keep", b"k"), ("gone", b"g"), ("dir/", None), ("dir/old", b"o"),
                  ("opaque/", None), ("opaque/hidden", b"h")])
    upper = _tar([(".wh.gone", b""), ("opaque/", None), ("opaque/.wh..wh..opq", b""),
                  ("opaque/new", b"n"), ("dir/added", b"a")])
    load(store, make_layout(tmp_path / "layout", layers=[lower, upper]))
    return store.image("docker.io/library/evil:1")


def test_layer_dirs_hold_overlay_whiteouts(store, two_layer_image):
    upper = store.layer_dir(two_layer_image.layers()[1].diff_id)
    st = os.lstat(upper / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(upper / "opaque", "trusted.overlay.opaque") == b"y"
    assert (upper / "opaque" / "new").read_bytes() == b"n"
    assert not (upper / ".wh.gone").exists()


def test_layer_dirs_stack_as_a_real_overlay(store, two_layer_image, tmp_path):
    dirs = [store.layer_dir(la.diff_id) for la in two_layer_image.layers()]
    merged = tmp_path / "merged"
    merged.mkdir()
    lowers = ":".join(str(d) for d in reversed(dirs))  # top layer first
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowers}",
                    str(merged)], check=True)
    try:
        names = sorted(os.path.relpath(os.path.join(d, n), merged)
                       for d, ds, fs in os.walk(merged) for n in ds + fs)
        assert names == ["dir", "dir/added", "dir/old", "keep", "opaque", "opaque/new"]
    finally:
        subprocess.run(["umount", str(merged)], check=True)
