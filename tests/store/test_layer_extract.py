"""extract_layer on real layers: tars made by GNU tar and by Python's tarfile,
compared against GNU tar's own extraction of the same tar (as root, preserving
owners, modes, xattrs and devices)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest
import zstandard

from store.errors import LayerError
from store.layer_extract import DEFAULT_LIMITS, ExtractResult, extract_layer
from tests.store import tarcraft as tc

LAYER = "sha256:" + "cd" * 32
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ZST = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_GZ = "application/vnd.docker.image.rootfs.diff.tar.gzip"

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners, devices)")

MTIME = 1_000_000_000
CAP = b"\x01\x00\x00\x02" + b"\x20\x00\x00\x00" + b"\x00" * 12  # cap_net_bind_service, v2


def _touch(path, mtime_ns):
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def make_tree(root: str) -> None:
    """A rootfs-like tree using every feature a layer can carry."""
    r = os.fsencode(root)

    def p(*parts: bytes) -> bytes:
        return os.path.join(r, *parts)

    for d, mode in ((b"usr/bin", 0o755), (b"etc", 0o755), (b"tmp", 0o1777),
                    (b"srv/data", 0o750), (b"var/mail", 0o2775), (b"dev", 0o755),
                    (b"run", 0o755), (b"bin\xff", 0o755)):
        os.makedirs(p(d), exist_ok=True)
        os.chmod(p(d), mode)
    files = {
        b"usr/bin/tool": (b"#!/bin/sh\necho tool\n", 0o4755, 0, 0),
        b"usr/bin/sgid": (b"sgid", 0o2755, 0, 0),
        b"etc/conf": (b"key=value\n" * 100, 0o640, 0, 42),
        b"srv/data/owned": (b"by 1000", 0o600, 1000, 1000),
        b"srv/data/bigid": (b"big uid", 0o644, 10_000_000, 3_000_000),
        b"etc/empty": (b"", 0o444, 0, 0),
        b"etc/random.bin": (os.urandom(300_000), 0o644, 0, 0),
        b"bin\xff/caf\xe9": (b"latin-1 name", 0o755, 0, 0),
        b"usr/bin/cap": (b"capable", 0o755, 0, 0),
    }
    for name, (data, mode, uid, gid) in files.items():
        with open(p(name), "wb") as f:
            f.write(data)
        os.chown(p(name), uid, gid)
        os.chmod(p(name), mode)
    os.chown(p(b"srv/data"), 1000, 1000)
    os.chown(p(b"var/mail"), 0, 8)
    os.setxattr(p(b"etc/conf"), b"user.note", b"hello")
    os.setxattr(p(b"srv/data"), b"user.dir", b"\x00binary\xff")
    os.setxattr(p(b"usr/bin/cap"), b"security.capability", CAP)
    long_dir = p(b"long", b"x" * 150)
    os.makedirs(long_dir)
    with open(os.path.join(long_dir, b"y" * 200), "wb") as f:
        f.write(b"long name")
    os.link(p(b"usr/bin/tool"), p(b"usr/bin/tool2"))
    os.link(os.path.join(long_dir, b"y" * 200), p(b"long", b"z" * 180))
    os.symlink(b"tool", p(b"usr/bin/alias"))
    os.symlink(b"/etc/conf", p(b"etc/abs"))
    os.symlink(b"../../nonexistent", p(b"etc/dangling"))
    os.mknod(p(b"dev/null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(p(b"dev/loop0"), stat.S_IFBLK | 0o660, os.makedev(7, 0))
    os.mkfifo(p(b"run/fifo"), 0o600)
    # distinct mtimes, deepest first so directory times stick
    everything = []
    for top, dirs, names in os.walk(r):
        everything += [os.path.join(top, n) for n in dirs + names]
    for i, path in enumerate(sorted(everything, key=lambda x: -x.count(b"/"))):
        _touch(path, (MTIME + i * 1000) * 10**9 + 123_456_789)
    _touch(r, MTIME * 10**9)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("building the reference tree needs root")
    root = tmp_path_factory.mktemp("src") / "rootfs"
    root.mkdir()
    make_tree(str(root))
    return root


def gnu_tar(src, out, fmt: str) -> bytes:
    subprocess.run(
        ["tar", f"--format={fmt}", "--xattrs", "--xattrs-include=*", "--numeric-owner",
         "-C", str(src), "-cf", str(out), "."],
        check=True,
    )
    return out.read_bytes()


def python_tar(src, out) -> bytes:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as t:
        t.add(str(src), arcname=".")
    return out.read_bytes()


def reference_extract(tar_bytes: bytes, dest) -> None:
    dest.mkdir()
    subprocess.run(
        ["tar", "-x", "--xattrs", "--xattrs-include=*", "--same-owner", "--same-permissions",
         "--numeric-owner", "-C", str(dest)],
        input=tar_bytes, check=True,
    )


def kiln_extract(blob: bytes, media_type: str, dest, **kw) -> ExtractResult:
    kw.setdefault("expected_diff_id", None)
    return extract_layer(io.BytesIO(blob), media_type, dest, layer_digest=LAYER, **kw)


def diff_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def comparable(snap: dict, *, symlink_times: bool = True) -> dict:
    out = {}
    for path, info in snap.items():
        info = dict(info)
        if stat.S_ISLNK(info["mode"]) and not symlink_times:
            info.pop("mtime_ns")
        if stat.S_ISDIR(info["mode"]):
            info.pop("size")  # directory sizes depend on the history of the directory
        out[path] = info
    return out


# --------------------------------------------------------------------------- real layers


@root_only
@pytest.mark.parametrize("maker", ["gnu-posix", "gnu-gnu", "python-pax"])
def test_layer_matches_gnu_tar_extraction(tree, tmp_path, maker):
    out = tmp_path / "layer.tar"
    if maker == "python-pax":
        data = python_tar(tree, out)
    else:
        data = gnu_tar(tree, out, maker.split("-")[1])
    ref, got = tmp_path / "ref", tmp_path / "got"
    reference_extract(data, ref)
    result = kiln_extract(data, OCI_TAR, got, expected_diff_id=diff_id(data))
    assert result.diff_id == diff_id(data)
    assert result.uncompressed_size == len(data)
    assert comparable(tc.snapshot(got)) == comparable(tc.snapshot(ref))


@root_only
def test_layer_reproduces_the_source_tree(tree, tmp_path):
    """Independent of GNU tar's extraction: the things a user sees match the source."""
    data = gnu_tar(tree, tmp_path / "l.tar", "posix")
    got = tmp_path / "got"
    kiln_extract(data, OCI_TAR, got)
    g = os.fsencode(got)
    src = tc.snapshot(tree)
    mine = tc.snapshot(got)
    assert sorted(src) == sorted(mine)
    for path, info in src.items():
        m = mine[path]
        for key in ("mode", "uid", "gid", "rdev", "nlink", "sha256", "target", "xattrs"):
            assert m.get(key) == info.get(key), (path, key)
        if not stat.S_ISLNK(info["mode"]):
            assert m["mtime_ns"] == info["mtime_ns"], path
    assert stat.S_IMODE(os.lstat(got / "usr/bin/tool").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(got / "tmp").st_mode) == 0o1777
    assert os.lstat(got / "srv/data/bigid").st_uid == 10_000_000
    assert os.getxattr(got / "usr/bin/cap", "security.capability") == CAP
    assert os.readlink(got / "etc/abs") == "/etc/conf"
    assert os.lstat(got / "usr/bin/tool").st_ino == os.lstat(got / "usr/bin/tool2").st_ino
    assert os.lstat(os.path.join(g, b"bin\xff/caf\xe9")).st_size == len(b"latin-1 name")
    assert stat.S_ISCHR(os.lstat(got / "dev/null").st_mode)
    assert os.lstat(got / "dev/loop0").st_rdev == os.makedev(7, 0)
    assert stat.S_ISFIFO(os.lstat(got / "run/fifo").st_mode)


def _compress(kind: str, data: bytes) -> bytes:
    if kind == "gzip-cli":
        return subprocess.run(["gzip", "-c"], input=data, capture_output=True,
                              check=True).stdout
    if kind == "zstd-cli":
        return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True,
                              check=True).stdout
    if kind == "gzip-multi-member":
        half = len(data) // 2
        return gzip.compress(data[:half]) + gzip.compress(data[half:])
    if kind == "zstd-multi-frame":
        c = zstandard.ZstdCompressor(write_checksum=True)
        half = len(data) // 3
        return c.compress(data[:half]) + c.compress(data[half:])
    if kind == "zstd-skippable-frame":
        skippable = b"\x50\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"hello"
        return zstandard.ZstdCompressor().compress(data) + skippable
    if kind == "gzip-zero-padded":
        return gzip.compress(data) + b"\0" * 1000
    return data


@root_only
@pytest.mark.parametrize(
    "kind,media_type",
    [
        ("none", OCI_TAR),
        ("gzip-cli", OCI_GZ),
        ("zstd-cli", OCI_ZST),
        ("gzip-cli", DOCKER_GZ),
        ("gzip-cli", "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"),
        ("none", "application/vnd.docker.image.rootfs.diff.tar"),
        ("none", DOCKER_GZ),  # registries serve plain tars under the gzip type
        ("zstd-cli", OCI_GZ),  # the bytes decide, not the label
        ("zstd-cli", "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"),
        ("gzip-cli", "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"),
        ("none", "application/vnd.oci.image.layer.nondistributable.v1.tar"),
        ("gzip-multi-member", OCI_GZ),
        ("zstd-multi-frame", OCI_ZST),
        ("zstd-skippable-frame", OCI_ZST),
        ("gzip-zero-padded", OCI_GZ),
    ],
)
def test_compressions_and_media_types(tree, tmp_path, kind, media_type):
    data = gnu_tar(tree, tmp_path / "l.tar", "posix")
    ref = tmp_path / "ref"
    reference_extract(data, ref)
    got = tmp_path / "got"
    result = kiln_extract(_compress(kind, data), media_type, got, expected_diff_id=diff_id(data))
    assert result.diff_id == diff_id(data)
    assert comparable(tc.snapshot(got)) == comparable(tc.snapshot(ref))


@root_only
@pytest.mark.parametrize("kind,media_type", [("gzip-cli", OCI_GZ), ("zstd-cli", OCI_ZST)])
def test_truncated_real_layer_is_refused_and_removed(tree, tmp_path, kind, media_type):
    data = gnu_tar(tree, tmp_path / "l.tar", "posix")
    blob = _compress(kind, data)
    for cut in (len(blob) // 3, len(blob) - 9, len(blob) - 1):
        got = tmp_path / f"got{cut}"
        with pytest.raises(LayerError) as info:
            kiln_extract(blob[:cut], media_type, got)
        assert info.value.layer == LAYER
        assert "truncated" in str(info.value) or "corrupt" in str(info.value)
        assert not os.path.lexists(got)


@root_only
def test_wrong_diff_id_removes_the_layer(tree, tmp_path):
    data = gnu_tar(tree, tmp_path / "l.tar", "posix")
    got = tmp_path / "got"
    wrong = diff_id(data + b"\0")  # trailing blocks are part of the diff_id
    with pytest.raises(LayerError, match="diff_id mismatch") as info:
        kiln_extract(_compress("zstd-cli", data), OCI_ZST, got, expected_diff_id=wrong)
    assert info.value.layer == LAYER
    assert not os.path.lexists(got)


class _Dripping(io.RawIOBase):
    """``fast`` at once, then ``slow`` a byte every 10 ms (a slow registry), giving up
    after ``patience`` seconds of dripping."""

    def __init__(self, fast: bytes, slow: bytes, patience: float):
        self._fast, self._slow, self._patience = fast, slow, patience
        self._until: float | None = None

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self._fast:
            data, self._fast = self._fast, b""
            return data
        self._until = self._until or time.monotonic() + self._patience
        if not self._slow or time.monotonic() > self._until:
            return b""
        time.sleep(0.01)
        data, self._slow = self._slow[:1], self._slow[1:]
        return data


def test_a_refused_layer_stops_reading_a_slow_source_at_once(tmp_path):
    """The first header is refused while the reader waits, inside libzstd, for a whole
    output chunk from a source that sends a byte at a time: extract_layer returns at once,
    not when that chunk (or the source's patience) is complete."""
    zstd = zstandard.ZstdCompressor()
    not_a_header = b"\xff" * 512
    fast = zstd.compress(not_a_header + bytes((1 << 20) - 512))  # the reader's first chunk
    slow = zstd.compress(os.urandom(1 << 20))  # its second: a MiB it never gets
    got = tmp_path / "got"
    started = time.monotonic()
    with pytest.raises(LayerError):
        extract_layer(_Dripping(fast, slow, patience=5), OCI_ZST, got, expected_diff_id=None)
    took = time.monotonic() - started
    assert took < 1, f"extract_layer took {took:.1f}s"
    assert not os.path.lexists(got)


def test_diff_id_covers_trailing_blocks(tmp_path):
    data = tc.tar(tc.file(b"f", b"x")) + b"\0" * 8192
    result = kiln_extract(data, OCI_TAR, tmp_path / "a", expected_diff_id=diff_id(data))
    assert result.uncompressed_size == len(data) and result.entries == 1
    with pytest.raises(LayerError, match="diff_id"):
        kiln_extract(data, OCI_TAR, tmp_path / "b", expected_diff_id=diff_id(data[:-512]))


def test_existing_dest_is_refused_and_kept(tmp_path):
    dest = tmp_path / "exists"
    dest.mkdir()
    (dest / "keep").write_bytes(b"mine")
    with pytest.raises(LayerError, match="already exists"):
        kiln_extract(tc.tar(tc.file(b"f")), OCI_TAR, dest)
    assert (dest / "keep").read_bytes() == b"mine"


def test_malformed_expected_diff_id_is_refused(tmp_path):
    with pytest.raises(LayerError, match="diff_id"):
        kiln_extract(tc.tar(tc.file(b"f")), OCI_TAR, tmp_path / "d", expected_diff_id="sha256:x")
    assert not os.path.lexists(tmp_path / "d")


# --------------------------------------------------------------------------- overlay format


@root_only
def test_whiteouts_become_overlay_whiteouts(tmp_path):
    data = tc.tar(
        tc.directory(b"./"),
        tc.file(b".wh.gone"),
        tc.directory(b"etc/"),
        tc.file(b"etc/.wh.passwd"),
        tc.directory(b"opaque/", mode=0o711),
        tc.file(b"opaque/.wh..wh..opq"),
        tc.file(b"opaque/new", b"added in this layer"),
        tc.file(b"implicit/.wh..wh..opq"),
    )
    got = tmp_path / "got"
    kiln_extract(data, OCI_TAR, got)
    for name in ("gone", "etc/passwd"):
        st = os.lstat(got / name)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0)
    assert os.getxattr(got / "opaque", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(got / "implicit", "trusted.overlay.opaque") == b"y"
    assert stat.S_IMODE(os.lstat(got / "opaque").st_mode) == 0o711
    assert (got / "opaque/new").read_bytes() == b"added in this layer"
    names = [n for _t, ds, fs in os.walk(got) for n in ds + fs]
    assert not [n for n in names if n.startswith(".wh.")]


@root_only
def test_overlay_mount_sees_whiteouts_and_opaque_dirs(tmp_path):
    """The extracted dir works as an overlay lowerdir above another layer."""
    lower = tmp_path / "lower"
    kiln_extract(tc.tar(tc.file(b"a", b"A"), tc.file(b"b", b"B"), tc.file(b"d/old", b"o")),
                 OCI_TAR, lower)
    upper = tmp_path / "upper"
    kiln_extract(tc.tar(tc.file(b".wh.a"), tc.file(b"d/.wh..wh..opq"), tc.file(b"d/new", b"n")),
                 OCI_TAR, upper)
    merged = tmp_path / "merged"
    merged.mkdir()
    opts = f"lowerdir={upper}:{lower}"
    mount = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)],
                           capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount overlay here: {mount.stderr.decode().strip()}")
    try:
        assert sorted(os.listdir(merged)) == ["b", "d"]
        assert os.listdir(merged / "d") == ["new"]
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_root_entry_sets_layer_root_metadata(tmp_path):
    got = tmp_path / "got"
    kiln_extract(tc.tar(tc.directory(b"./", mode=0o700, mtime=1234), tc.file(b"f")), OCI_TAR,
                 got)
    st = os.lstat(got)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_mtime == 1234


def test_missing_parents_are_created_root_owned_0755(tmp_path):
    got = tmp_path / "got"
    kiln_extract(tc.tar(tc.file(b"a/b/c/f", b"x", mtime=5)), OCI_TAR, got)
    for d in ("a", "a/b", "a/b/c"):
        st = os.lstat(got / d)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
        assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
    assert os.lstat(got / "a/b/c/f").st_mtime == 5


@root_only
def test_pax_records_override_header_fields(tmp_path):
    data = tc.tar(
        tc.pax([(b"path", b"real/name"), (b"uid", b"4242"), (b"gid", b"4343"),
                (b"mtime", b"1500000000.5"), (b"size", b"5"), (b"SCHILY.xattr.user.k", b"v")]),
        tc.header(b"fake", size=0) + tc.pad(b"hello"),
        tc.pax([(b"linkpath", b"t" * 300)]),
        tc.symlink(b"sym", b"short"),
        tc.pax([(b"comment", b"global, ignored")], typeflag=b"g"),
        tc.gnu_long(b"g/" + b"n" * 200),
        tc.file(b"ignored", b"gnu long name"),
        tc.gnu_long(b"g/" + b"n" * 200, typeflag=b"K"),
        tc.hardlink(b"hl", b"ignored"),
        tc.pax([(b"mtime", b"-86400.25")]),
        tc.file(b"old", b"before 1970"),
    )
    got = tmp_path / "got"
    result = kiln_extract(data, OCI_TAR, got)
    assert result.entries == 5
    st = os.lstat(got / "real/name")
    assert (got / "real/name").read_bytes() == b"hello"
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (4242, 4343, 1_500_000_000_500_000_000)
    assert os.getxattr(got / "real/name", "user.k") == b"v"
    assert os.readlink(got / "sym") == "t" * 300
    assert (got / ("g/" + "n" * 200)).read_bytes() == b"gnu long name"
    assert os.lstat(got / "hl").st_ino == os.lstat(got / ("g/" + "n" * 200)).st_ino
    assert os.lstat(got / "old").st_mtime_ns == -86_400_250_000_000


def test_base256_and_v7_directory(tmp_path):
    data = tc.tar(
        tc.header(b"olddir/", typeflag=b"\0", mode=0o750),
        tc.file(b"olddir/f", b"x", uid_field=tc.base256(os.geteuid(), 8)),
    )
    got = tmp_path / "got"
    kiln_extract(data, OCI_TAR, got)
    assert stat.S_ISDIR(os.lstat(got / "olddir").st_mode)
    assert stat.S_IMODE(os.lstat(got / "olddir").st_mode) == 0o750


@pytest.mark.parametrize("version", ["0.0", "0.1", "1.0", "gnu"])
def test_sparse_files(tmp_path, version):
    src = tmp_path / "src"
    src.mkdir()
    size = 64 << 20
    with open(src / "sparse", "wb") as f:
        f.truncate(size)
        f.seek(5_000_000)
        f.write(b"middle")
        f.seek(size - 4)
        f.write(b"tail")
    if version == "gnu":
        fmt = ["--format=gnu"]
    else:
        fmt = ["--format=posix", f"--sparse-version={version}"]
    subprocess.run(["tar", *fmt, "--sparse", "-C", str(src), "-cf", str(tmp_path / "s.tar"),
                    "sparse"], check=True)
    data = (tmp_path / "s.tar").read_bytes()
    assert len(data) < 1 << 20
    got = tmp_path / "got"
    kiln_extract(data, OCI_TAR, got, expected_diff_id=diff_id(data))
    with open(src / "sparse", "rb") as a, open(got / "sparse", "rb") as b:
        assert hashlib.sha256(a.read()).digest() == hashlib.sha256(b.read()).digest()
    assert os.stat(got / "sparse").st_blocks * 512 < 1 << 20  # holes stay holes


def test_many_small_files_and_directories(tmp_path):
    """More directories than the fd cache holds, files revisiting earlier dirs."""
    parts = []
    for i in range(600):
        parts.append(tc.directory(b"d%03d/" % i, mode=0o700 + (i % 2) * 0o55))
        parts.append(tc.file(b"d%03d/f" % i, b"%d" % i))
    for i in range(0, 600, 7):  # go back to early directories after the cache was trimmed
        parts.append(tc.file(b"d%03d/late" % i, b"late"))
    got = tmp_path / "got"
    fds_before = len(os.listdir("/proc/self/fd"))
    result = kiln_extract(tc.tar(*parts), OCI_TAR, got)
    assert len(os.listdir("/proc/self/fd")) == fds_before  # every fd was closed
    assert result.entries == 1200 + len(range(0, 600, 7))
    assert (got / "d599/f").read_bytes() == b"599"
    assert (got / "d007/late").read_bytes() == b"late"
    assert stat.S_IMODE(os.lstat(got / "d001").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(got / "d002").st_mode) == 0o700


class _Dribble(io.RawIOBase):
    """A stream that hands out at most ``step`` bytes per read, like a slow socket."""

    def __init__(self, data: bytes, step: int):
        self._data, self._pos, self._step = data, 0, step

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        k = self._step if n is None or n < 0 else min(n, self._step)
        out = self._data[self._pos : self._pos + k]
        self._pos += len(out)
        return out


@pytest.mark.parametrize("step", [1, 777, 4096 + 3])
def test_result_does_not_depend_on_how_the_stream_is_cut(tmp_path, step):
    """Headers, PAX records and file data straddling chunk boundaries."""
    long_path = "p/" + "x" * 200 + "/" + "w" * 100
    data = tc.tar(
        tc.pax([(b"path", long_path.encode()), (b"SCHILY.xattr.user.a", b"1" * 999)]),
        tc.file(b"ignored", os.urandom(5000)),
        tc.gnu_long(b"q/" + b"y" * 250),
        tc.file(b"ignored", b"z" * 1500),
        tc.file(b"small", b"s"),
        tc.symlink(b"link", b"small"),
    ) + b"\0" * 3000
    blob, media_type = {
        1: (data, OCI_TAR),
        777: (gzip.compress(data), OCI_GZ),
        4099: (zstandard.ZstdCompressor(write_checksum=True).compress(data), OCI_ZST),
    }[step]
    got = tmp_path / "got"
    result = extract_layer(_Dribble(blob, step), media_type, got, expected_diff_id=diff_id(data))
    assert result.entries == 4
    assert (got / long_path).stat().st_size == 5000
    assert os.getxattr(got / long_path, "user.a") == b"1" * 999
    assert (got / ("q/" + "y" * 250)).read_bytes() == b"z" * 1500
    assert os.readlink(got / "link") == "small"


@root_only
def test_unprivileged_extraction_skips_devices(tmp_path):
    """As an ordinary user: devices are skipped with a note, owners are not applied,
    the opaque marker uses the user.overlay namespace (overlay's userxattr mode)."""
    data = tc.tar(
        tc.header(b"dev/null", typeflag=b"3", devmajor=1, devminor=3, mode=0o666),
        tc.file(b"f", b"x", uid=1234),
        tc.directory(b"ro/", mode=0o555),
        tc.file(b"ro/inside", b"y"),
        tc.file(b"d/.wh..wh..opq"),
        tc.file(b"d/.wh.gone"),
    )
    work = tmp_path / "work"
    work.mkdir()
    os.chown(work, 65534, 65534)
    (tmp_path / "l.tar").write_bytes(data)
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.getcwd()!r})
        from store.layer_extract import extract_layer  # before dropping root: ~root/ modules
        f = open({str(tmp_path / "l.tar")!r}, "rb")
        os.chdir({str(work)!r})  # pytest's tmp dirs are root-only above this point
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
        with f:
            r = extract_layer(f, {OCI_TAR!r}, "got", expected_diff_id=None)
        print(r.notes)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if "user.overlay" in proc.stderr and "Operation not supported" in proc.stderr:
        pytest.skip("filesystem without user xattrs")
    assert proc.returncode == 0, proc.stderr
    assert "dev/null" in proc.stdout
    got = work / "got"
    assert not os.path.lexists(got / "dev/null")
    assert os.lstat(got / "f").st_uid == 65534
    assert (got / "ro/inside").read_bytes() == b"y"
    assert os.getxattr(got / "d", "user.overlay.opaque") == b"y"
    assert stat.S_ISCHR(os.lstat(got / "d/gone").st_mode)  # whiteouts need no CAP_MKNOD (5.8+)
    shutil.rmtree(work)


def test_default_limits_are_sane():
    assert DEFAULT_LIMITS.max_entries < 1_000_000
    assert DEFAULT_LIMITS.max_header_bytes == 1 << 20
    assert DEFAULT_LIMITS.max_path_bytes == 4096
    assert DEFAULT_LIMITS.max_zstd_window_log == 27
    assert DEFAULT_LIMITS.max_total_bytes >= 64 << 30
