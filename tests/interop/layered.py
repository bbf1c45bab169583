"""A two-layer image with whiteouts, an opaque dir and awkward entries, for the interop tests.

The layers are written by kiln's layer writer from overlay-format trees (0:0 char
devices, ``trusted.overlay.opaque``); the OCI layout around them is assembled here,
by hand, so nothing but the layer tars comes from kiln before ``kiln load``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

LAYERED = "example.com/interop/layered:1"

LONG_PATH = "d" * 120 + "/" + "f" * 150  # > 100 (ustar name) and > 255 (ustar prefix+name)
LONG_TARGET = "t" * 200
UNICODE_NAME = "ünïcødé-名前"
BINARY_NAME = b"not-utf8-\xff\xfe"
BIG_ID = 3_000_000  # above the 7-digit octal limit of a ustar uid/gid field

GONE = ("gone.txt", "gonedir", "gonedir/inner.txt", "opaque/old1", "opaque/sub",
        "opaque/sub/old2")


def _write(path: Path, data: bytes, mode: int = 0o644, owner: tuple[int, int] = (0, 0),
           mtime: int = 1_600_000_000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chown(path, *owner)
    os.chmod(path, mode)
    os.utime(path, (mtime, mtime))


def make_lower(root: Path) -> None:
    _write(root / "gone.txt", b"deleted by the upper layer\n")
    _write(root / "gonedir" / "inner.txt", b"whole dir deleted\n")
    _write(root / "opaque" / "old1", b"hidden by the opaque dir\n")
    _write(root / "opaque" / "sub" / "old2", b"also hidden\n")
    _write(root / "keep" / "same.txt", b"kept as is\n", 0o640, (1000, 1001))
    _write(root / "replaced.txt", b"lower\n")
    _write(root / "setuid", b"#!/bin/sh\n", 0o4755)
    _write(root / "hard1", b"two names, one inode\n", 0o600, (7, 8))
    os.link(root / "hard1", root / "hard2")
    os.symlink("keep/same.txt", root / "link")
    os.mkfifo(root / "fifo", 0o620)
    (root / "empty").mkdir(mode=0o700)
    _write(root / "with-xattr", b"x\n")
    os.setxattr(root / "with-xattr", "user.kiln.interop", b"lower value")
    _write(root / LONG_PATH, b"long path\n")
    os.symlink(LONG_TARGET, root / "longlink")
    _write(root / "bigid", b"big ids\n", 0o644, (BIG_ID, BIG_ID + 1))
    _write(root / UNICODE_NAME, b"unicode\n")
    with open(os.fsencode(root) + b"/" + BINARY_NAME, "wb") as f:
        f.write(b"binary name\n")
    _write(root / "before-1970", b"old\n", mtime=-100)
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "loop200", stat.S_IFBLK | 0o600, os.makedev(7, 200))


def make_upper(root: Path) -> None:
    root.mkdir()
    os.mknod(root / "gone.txt", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.mknod(root / "gonedir", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (root / "opaque").mkdir()
    os.setxattr(root / "opaque", "trusted.overlay.opaque", b"y")
    _write(root / "opaque" / "new", b"only file left in opaque/\n", 0o600, (33, 33))
    _write(root / "keep" / "extra.txt", b"merged into keep/\n")
    _write(root / "replaced.txt", b"upper\n", 0o600)
    _write(root / "added" / "deep" / "file.txt", b"new\n", 0o755, (0, 100))


def assemble_layout(layout: Path, layer_sources: list[Path], name: str = LAYERED) -> None:
    """An OCI layout written by hand around layers from kiln's layer writer."""
    from store.layer_writer import write_layer
    from store.store import host_platform

    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return "sha256:" + digest

    layers, diff_ids = [], []
    for i, src in enumerate(layer_sources):
        tmp = layout / f"layer{i}"
        with open(tmp, "wb") as out:
            blob = write_layer(src, out)
        tmp.rename(blobs / blob.digest.split(":")[1])
        layers.append({"mediaType": blob.media_type, "digest": blob.digest, "size": blob.size})
        diff_ids.append(blob.diff_id)
    config = json.dumps({
        **host_platform(),
        "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"layer {i}"} for i in range(len(diff_ids))],
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(config), "size": len(config)},
        "layers": layers,
    }).encode()
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": put(manifest), "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": name}}]}
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


def load_layered(kiln, work: Path) -> None:
    """Make the two layer trees under ``work`` and ``kiln load`` the image as LAYERED."""
    lower, upper = work / "lower", work / "upper"
    make_lower(lower)
    make_upper(upper)
    assemble_layout(work / "assembled", [lower, upper])
    kiln("load", "-q", "-i", str(work / "assembled"))


def check_merged_view(rootfs: Path, *, pre_epoch_mtime: int = -100) -> None:
    """What a user of the unpacked or running image notices, entry by entry.

    ``pre_epoch_mtime``: what the tool makes of the file dated 1969 (-100 when kept).
    """
    names = {os.fsdecode(p.relative_to(rootfs)) for p in rootfs.rglob("*")}
    for gone in GONE:
        assert gone not in names, f"{gone} should have been deleted by a whiteout"
    assert not [n for n in names if ".wh." in n], "OCI whiteout files leaked into the rootfs"
    assert sorted(os.listdir(rootfs / "opaque")) == ["new"]
    assert sorted(os.listdir(rootfs / "keep")) == ["extra.txt", "same.txt"]
    assert (rootfs / "replaced.txt").read_bytes() == b"upper\n"
    assert stat.S_IMODE((rootfs / "replaced.txt").stat().st_mode) == 0o600
    assert (rootfs / "added" / "deep" / "file.txt").read_bytes() == b"new\n"
    st = (rootfs / "keep" / "same.txt").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1001, 0o640)
    assert stat.S_IMODE((rootfs / "setuid").stat().st_mode) == 0o4755
    assert (rootfs / "hard1").stat().st_ino == (rootfs / "hard2").stat().st_ino
    assert stat.S_ISFIFO((rootfs / "fifo").lstat().st_mode)
    assert os.readlink(rootfs / "link") == "keep/same.txt"
    assert os.getxattr(rootfs / "with-xattr", "user.kiln.interop") == b"lower value"
    assert (rootfs / LONG_PATH).read_bytes() == b"long path\n"
    assert os.readlink(rootfs / "longlink") == LONG_TARGET
    st = (rootfs / "bigid").stat()
    assert (st.st_uid, st.st_gid) == (BIG_ID, BIG_ID + 1)
    assert (rootfs / UNICODE_NAME).read_bytes() == b"unicode\n"
    with open(os.fsencode(rootfs) + b"/" + BINARY_NAME, "rb") as f:
        assert f.read() == b"binary name\n"
    assert (rootfs / "before-1970").lstat().st_mtime == pre_epoch_mtime
    st = (rootfs / "null").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    st = (rootfs / "loop200").lstat()
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 200)
