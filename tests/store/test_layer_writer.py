"""The deterministic layer writer, checked against real trees, GNU tar and tarfile.

These tests make device nodes, chown files and set security.* / trusted.* xattrs, so
they run as root (as the project's CI does).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import socket
import stat
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import zstandard

from store.errors import KilnError, LayerError
from store.layer_writer import (
    CHUNK_SIZE,
    MEDIA_TYPE_GZIP,
    MEDIA_TYPE_TAR,
    MEDIA_TYPE_ZSTD,
    ZSTD_JOB_SIZE,
    LayerBlob,
    compress_stream,
    write_layer,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, chown, xattrs)")

REPO = Path(__file__).resolve().parents[2]
EPOCH = 1_700_000_000
OLD = 1_600_000_000
NEW = 1_800_000_000
MEDIA_TYPES = {"zstd": MEDIA_TYPE_ZSTD, "gzip": MEDIA_TYPE_GZIP, "none": MEDIA_TYPE_TAR}
# security.capability v2: cap_net_bind_service (bit 10) permitted + effective.
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
LONG_SPLITTABLE = b"long/" + b"x" * 60 + b"/" + b"y" * 90  # 156 bytes: fits ustar prefix+name
LONG_PAX = b"deep/" + b"/".join([b"p" * 99] * 3)  # > 255 bytes: needs a PAX path
NON_UTF8 = b"bin\xff\xfename"
LONG_TARGET = b"../" + b"t" * 150
BIG_UID = 3_000_000  # too large for ustar's 7 octal digits


def _random(n: int, seed: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d-%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:n])


# (path, kind, options). Created in list order (or reversed), then owners/modes/xattrs,
# then mtimes bottom-up, so the tree does not depend on creation order.
TREE_SPEC: list[tuple[bytes, str, dict]] = [
    (b"a", "dir", {}),
    (b"a/b", "dir", {"mode": 0o750, "uid": 1000, "gid": 1001}),
    (b"a-c", "file", {"data": b"dash sorts before slash\n"}),
    (
        b"a/b/file.txt",
        "file",
        {
            "data": b"hello\n",
            "mode": 0o640,
            "uid": 1000,
            "gid": 1001,
            "xattrs": {"user.comment": b"hi there", "user.bin": b"\x00\xff\x01"},
        },
    ),
    (
        b"a/ping",
        "file",
        {"data": b"\x7fELF", "mode": 0o755, "xattrs": {"security.capability": CAPABILITY}},
    ),
    (b"a/setuid", "file", {"data": b"su", "mode": 0o4755}),
    (b"a/setgid-dir", "dir", {"mode": 0o2775}),
    (b"tmp", "dir", {"mode": 0o1777}),
    (b"a/link", "symlink", {"target": b"../target with spaces"}),
    (b"a/long-link", "symlink", {"target": LONG_TARGET}),
    (b"hard", "dir", {}),
    (b"hard/original", "file", {"data": b"linked content\n", "mode": 0o600}),
    (b"a/hard-link", "hardlink", {"target": b"hard/original"}),
    (b"dev", "dir", {}),
    (b"dev/null", "chr", {"rdev": (1, 3), "mode": 0o666}),
    (b"dev/loop0", "blk", {"rdev": (7, 0), "mode": 0o660, "gid": 6}),
    (b"dev/fifo", "fifo", {"mode": 0o620}),
    (b"long", "dir", {}),
    (b"long/" + b"x" * 60, "dir", {}),
    (LONG_SPLITTABLE, "file", {"data": b"long but splittable\n"}),
    (b"deep", "dir", {}),
    (b"deep/" + b"p" * 99, "dir", {}),
    (b"deep/" + b"p" * 99 + b"/" + b"p" * 99, "dir", {}),
    (LONG_PAX, "file", {"data": b"needs pax\n"}),
    (b"n" * 100, "file", {"data": b"name fills the ustar field exactly\n"}),
    (b"m" * 101, "file", {"data": b"one byte too long, no slash to split at\n"}),
    (NON_UTF8, "file", {"data": b"raw bytes name\n"}),
    ("café".encode(), "file", {"data": b"utf-8 name\n"}),
    (b"big-uid", "file", {"data": b"x", "uid": BIG_UID, "gid": BIG_UID}),
    (b"big.bin", "file", {"data": _random(CHUNK_SIZE + 4321, 1)}),
    (b"empty", "file", {"data": b""}),
    (b"new.txt", "file", {"data": b"newer than the epoch\n", "mtime": NEW}),
]


def build_tree(root: Path, *, reverse: bool = False) -> Path:
    root.mkdir()
    base = os.fsencode(root)
    spec = list(reversed(TREE_SPEC)) if reverse else TREE_SPEC
    for rel, kind, _ in sorted(spec, key=lambda item: item[0].count(b"/")):
        if kind == "dir":
            os.makedirs(base + b"/" + rel, exist_ok=True)
    for rel, kind, opts in spec:
        path = base + b"/" + rel
        if kind == "file":
            with open(path, "wb") as f:
                f.write(opts["data"])
        elif kind == "symlink":
            os.symlink(opts["target"], path)
        elif kind in ("chr", "blk"):
            type_bit = stat.S_IFCHR if kind == "chr" else stat.S_IFBLK
            os.mknod(path, type_bit | 0o600, os.makedev(*opts["rdev"]))
        elif kind == "fifo":
            os.mkfifo(path)
    for rel, kind, opts in spec:
        if kind == "hardlink" and not os.path.exists(base + b"/" + rel):
            os.link(base + b"/" + opts["target"], base + b"/" + rel)
    for rel, kind, opts in spec:
        path = base + b"/" + rel
        if kind in ("symlink", "hardlink"):
            continue
        os.chown(path, opts.get("uid", 0), opts.get("gid", 0))
        os.chmod(path, opts.get("mode", 0o755 if kind == "dir" else 0o644))
        xattrs = list(opts.get("xattrs", {}).items())
        for name, value in reversed(xattrs) if reverse else xattrs:
            os.setxattr(path, name, value)
    by_depth = sorted(spec, key=lambda item: -item[0].count(b"/"))
    for rel, _, opts in by_depth:
        os.utime(
            base + b"/" + rel,
            ns=(OLD * 10**9, opts.get("mtime", OLD) * 10**9 + 123),
            follow_symlinks=False,
        )
    os.utime(base, ns=(OLD * 10**9, OLD * 10**9))
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return build_tree(tmp_path_factory.mktemp("src") / "rootfs")


def write(source: Path, compression: str = "zstd", **kwargs) -> tuple[LayerBlob, bytes]:
    out = io.BytesIO()
    blob = write_layer(source, out, compression=compression, **kwargs)
    return blob, out.getvalue()


def decompress(data: bytes, compression: str) -> bytes:
    if compression == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if compression == "gzip":
        return gzip.decompress(data)
    return data


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def raw_members(tar_bytes: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as archive:
        return archive.getmembers()


def gnu_tar_names(tar_path: Path) -> list[bytes]:
    listing = subprocess.run(
        ["tar", "--quoting-style=literal", "-tf", str(tar_path)],
        check=True,
        capture_output=True,
    ).stdout
    return listing.splitlines()


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_same_tree_gives_same_bytes_wherever_it_lives(tree, tmp_path, compression):
    copied = tmp_path / "copied"
    subprocess.run(["cp", "-a", str(tree), str(copied)], check=True)
    rebuilt = build_tree(tmp_path / "rebuilt", reverse=True)
    assert os.stat(copied / "a-c").st_ino != os.stat(tree / "a-c").st_ino

    first, first_bytes = write(tree, compression, source_date_epoch=EPOCH)
    again, again_bytes = write(tree, compression, source_date_epoch=EPOCH)
    from_copy, _ = write(copied, compression, source_date_epoch=EPOCH)
    from_rebuilt, _ = write(rebuilt, compression, source_date_epoch=EPOCH)

    assert first_bytes == again_bytes
    assert first == again == from_copy == from_rebuilt
    assert first.media_type == MEDIA_TYPES[compression]


def test_zstd_output_is_the_same_for_any_worker_count(tmp_path):
    # Several zstd jobs' worth of mixed data, so the workers really split the frame.
    root = tmp_path / "tree"
    root.mkdir()
    for i in range(3):
        (root / f"random{i}.bin").write_bytes(os.urandom(ZSTD_JOB_SIZE - 1000 * i))
        (root / f"text{i}.txt").write_bytes(b"line %d of some text\n" * 200_000)
    results = {threads: write(root, threads=threads) for threads in (1, 2, 3)}
    digests = {blob.digest for blob, _ in results.values()}
    assert len(digests) == 1

    # The claim behind "threads >= 1 always": zstd's single-threaded mode makes a
    # different (equally valid) frame for the same tar stream.
    blob, data = results[1]
    tar_bytes = decompress(data, "zstd")
    single = zstandard.ZstdCompressor(
        compression_params=zstandard.ZstdCompressionParameters.from_level(3, threads=0)
    ).compress(tar_bytes)
    assert sha256(single) != blob.digest
    assert decompress(single, "zstd") == tar_bytes


def test_zstd_frame_is_stable_when_the_tar_ends_on_a_job_boundary(tmp_path):
    # A tar of exactly 8 zstd jobs: header (512) + data + end blocks (1024). Left alone,
    # zstd's workers race to decide whether the last job ends the frame or an empty block
    # follows, and the digest depends on thread count and timing (it did, here).
    root = tmp_path / "tree"
    root.mkdir()
    (root / "f").write_bytes(os.urandom(8 * ZSTD_JOB_SIZE - 1536))
    blobs = [write(root, threads=threads)[0] for threads in (1, 2, 1, 2)]
    assert blobs[0].uncompressed_size == 8 * ZSTD_JOB_SIZE
    assert len({blob.digest for blob in blobs}) == 1


def test_gzip_output_is_the_same_for_any_worker_count(tree):
    digests = {write(tree, "gzip", threads=threads)[0].digest for threads in (1, 2, 4)}
    assert len(digests) == 1


# ----------------------------------------------------------------------------- digests


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_descriptor_matches_the_bytes_written(tree, compression):
    blob, data = write(tree, compression)
    tar_bytes = decompress(data, compression)
    assert blob.size == len(data)
    assert blob.digest == sha256(data)
    assert blob.uncompressed_size == len(tar_bytes)
    assert blob.diff_id == sha256(tar_bytes)
    if compression == "none":
        assert blob.digest == blob.diff_id


def test_gzip_layer_has_a_fixed_header_and_a_valid_trailer(tree):
    _, data = write(tree, "gzip")
    assert data[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"  # mtime 0, no name
    result = subprocess.run(["gzip", "-t"], input=data, capture_output=True)
    assert result.returncode == 0, result.stderr


def test_zstd_cli_reads_the_layer(tree, tmp_path):
    blob, data = write(tree)
    path = tmp_path / "layer.tar.zst"
    path.write_bytes(data)
    tar_bytes = subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    assert sha256(tar_bytes) == blob.diff_id


# ----------------------------------------------------------------------------- tar format


def test_entries_are_sorted_relative_and_directories_end_with_slash(tree, tmp_path):
    _, tar_bytes = write(tree, "none")
    path = tmp_path / "layer.tar"
    path.write_bytes(tar_bytes)
    names = gnu_tar_names(path)
    assert names == sorted(names)
    assert len(names) == len(set(names))
    assert not any(name.startswith((b"./", b"/")) or name in (b"", b".") for name in names)
    assert b"a/" in names and b"a/b/" in names and b"a" not in names
    assert names.index(b"a-c") < names.index(b"a/") < names.index(b"a/b/file.txt")
    expected = {rel + (b"/" if kind == "dir" else b"") for rel, kind, _ in TREE_SPEC}
    assert set(names) == expected


def test_archive_ends_with_exactly_two_zero_blocks(tree):
    _, tar_bytes = write(tree, "none")
    members = raw_members(tar_bytes)
    last = members[-1]
    end_of_last = last.offset_data + -(-last.size // 512) * 512
    assert len(tar_bytes) == end_of_last + 1024
    assert tar_bytes[end_of_last:] == bytes(1024)


def test_pax_headers_only_where_ustar_cannot_say_it(tree):
    _, tar_bytes = write(tree, "none")
    by_name = {os.fsencode(m.name): m for m in raw_members(tar_bytes)}
    needs_pax = {
        LONG_PAX,
        NON_UTF8,
        "café".encode(),
        b"a/long-link",
        b"big-uid",
        b"a/b/file.txt",
        b"a/ping",
        b"m" * 101,
    }
    for name, member in by_name.items():
        assert bool(member.pax_headers) == (name in needs_pax), name
    assert by_name[LONG_SPLITTABLE].pax_headers == {}
    assert by_name[NON_UTF8].pax_headers["hdrcharset"] == "BINARY"
    assert by_name[b"big-uid"].pax_headers["uid"] == str(BIG_UID)
    for member in by_name.values():
        assert member.uname == "" and member.gname == ""
    # the PAX headers' own names carry no PID or path: always the same
    assert tar_bytes.count(b"././@PaxHeader") == len(needs_pax)


def test_tarfile_reads_every_kind_of_entry(tree):
    _, data = write(tree, "zstd", source_date_epoch=EPOCH)
    members = {os.fsencode(m.name): m for m in raw_members(decompress(data, "zstd"))}

    file_txt = members[b"a/b/file.txt"]
    assert file_txt.isfile() and file_txt.mode == 0o640
    assert (file_txt.uid, file_txt.gid) == (1000, 1001)
    assert file_txt.pax_headers["SCHILY.xattr.user.comment"] == "hi there"
    raw_bin = file_txt.pax_headers["SCHILY.xattr.user.bin"].encode("utf-8", "surrogateescape")
    assert raw_bin == b"\x00\xff\x01"
    ping = members[b"a/ping"].pax_headers["SCHILY.xattr.security.capability"]
    assert ping.encode("utf-8", "surrogateescape") == CAPABILITY
    assert members[b"a/setuid"].mode == 0o4755
    assert members[b"a/setgid-dir"].isdir() and members[b"a/setgid-dir"].mode == 0o2775
    assert members[b"tmp"].mode == 0o1777
    assert members[b"a/b"].isdir() and (members[b"a/b"].uid, members[b"a/b"].gid) == (1000, 1001)
    assert members[b"a/link"].issym() and members[b"a/link"].linkname == "../target with spaces"
    assert os.fsencode(members[b"a/long-link"].linkname) == LONG_TARGET
    # the first path in sorted order carries the data, the later one links to it
    assert members[b"a/hard-link"].isfile() and members[b"a/hard-link"].size == 15
    assert members[b"hard/original"].islnk()
    assert members[b"hard/original"].linkname == "a/hard-link"
    null = members[b"dev/null"]
    assert null.ischr() and (null.devmajor, null.devminor) == (1, 3) and null.mode == 0o666
    loop = members[b"dev/loop0"]
    assert loop.isblk() and (loop.devmajor, loop.devminor) == (7, 0) and loop.gid == 6
    assert members[b"dev/fifo"].isfifo() and members[b"dev/fifo"].mode == 0o620
    assert members[LONG_SPLITTABLE].isfile()
    assert members[LONG_PAX].isfile()
    assert members[NON_UTF8].isfile()
    assert members["café".encode()].isfile()
    assert (members[b"big-uid"].uid, members[b"big-uid"].gid) == (BIG_UID, BIG_UID)
    assert members[b"big.bin"].size == CHUNK_SIZE + 4321
    assert members[b"new.txt"].mtime == EPOCH
    assert members[b"a-c"].mtime == OLD


def test_gnu_tar_extracts_the_same_tree(tree, tmp_path):
    _, tar_bytes = write(tree, "none")
    layer = tmp_path / "layer.tar"
    layer.write_bytes(tar_bytes)
    dest = tmp_path / "extracted"
    dest.mkdir()
    subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--same-owner",
            "--numeric-owner",
            "-xpf",
            str(layer),
            "-C",
            str(dest),
        ],
        check=True,
        capture_output=True,
    )
    src_root, dst_root = os.fsencode(tree), os.fsencode(dest)
    for rel, kind, opts in TREE_SPEC:
        src = os.lstat(src_root + b"/" + rel)
        dst = os.lstat(dst_root + b"/" + rel)
        assert stat.S_IFMT(dst.st_mode) == stat.S_IFMT(src.st_mode), rel
        assert (dst.st_uid, dst.st_gid) == (src.st_uid, src.st_gid), rel
        if kind != "symlink":
            assert stat.S_IMODE(dst.st_mode) == stat.S_IMODE(src.st_mode), rel
            assert dst.st_mtime_ns == src.st_mtime_ns // 10**9 * 10**9, rel
        if kind in ("chr", "blk"):
            assert dst.st_rdev == src.st_rdev, rel
        if kind == "symlink":
            assert os.readlink(dst_root + b"/" + rel) == opts["target"]
        if kind in ("file", "hardlink"):
            with (
                open(dst_root + b"/" + rel, "rb") as got,
                open(src_root + b"/" + rel, "rb") as want,
            ):
                assert got.read() == want.read(), rel
        for name, value in opts.get("xattrs", {}).items():
            assert os.getxattr(dst_root + b"/" + rel, name) == value, (rel, name)
    assert os.stat(dest / "a/hard-link").st_ino == os.stat(dest / "hard/original").st_ino


def test_source_date_epoch_clamps_newer_mtimes_and_keeps_older(tree):
    clamped = {
        m.name: m.mtime for m in raw_members(write(tree, "none", source_date_epoch=EPOCH)[1])
    }
    unclamped = {m.name: m.mtime for m in raw_members(write(tree, "none")[1])}
    assert unclamped["new.txt"] == NEW and clamped["new.txt"] == EPOCH
    assert unclamped["a-c"] == clamped["a-c"] == OLD  # sub-second part dropped
    assert clamped["a"] == OLD
    assert (
        write(tree, "none", source_date_epoch=OLD - 1)[0].diff_id
        != write(tree, "none", source_date_epoch=EPOCH)[0].diff_id
    )


def test_sockets_are_skipped(tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    (root / "file").write_text("x")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "sock"))
        names = [m.name for m in raw_members(write(root, "none")[1])]
    finally:
        sock.close()
    assert names == ["file"]


def test_empty_tree_is_just_the_end_of_archive(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    for compression in ("zstd", "gzip", "none"):
        blob, data = write(root, compression)
        assert decompress(data, compression) == bytes(1024)
        assert blob.uncompressed_size == 1024


# ----------------------------------------------------------------------------- overlay


def make_upper(root: Path) -> Path:
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc/kept.conf").write_text("kept\n")
    os.setxattr(root / "etc/kept.conf", "trusted.overlay.origin", b"\x00\xfb\x21")
    os.setxattr(root / "etc/kept.conf", "user.note", b"stays")
    os.mknod(root / "etc/removed.conf", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    # overlayfs (>= 5.8) makes whiteouts as hardlinks of one shared inode
    os.mknod(root / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.link(root / "gone", root / "etc/also-gone")
    (root / "var").mkdir()
    (root / "var/cache").mkdir()
    os.setxattr(root / "var/cache", "trusted.overlay.opaque", b"y")
    os.setxattr(root / "var/cache", "trusted.overlay.impure", b"y")
    (root / "var/cache/!first").write_text("sorts before the opaque marker\n")
    (root / "var/cache/fresh").write_text("new content\n")
    (root / "var/lib").mkdir()
    os.setxattr(root / "var/lib", "trusted.overlay.opaque", b"x")  # not an opaque dir
    return root


def test_overlay_whiteouts_become_oci_whiteouts(tmp_path):
    upper = make_upper(tmp_path / "upper")
    blob, data = write(upper, "zstd", source_date_epoch=EPOCH)
    members = raw_members(decompress(data, "zstd"))
    names = [os.fsencode(m.name) + (b"/" if m.isdir() else b"") for m in members]
    assert names == [
        b".wh.gone",
        b"etc/",
        b"etc/.wh.also-gone",
        b"etc/.wh.removed.conf",
        b"etc/kept.conf",
        b"var/",
        b"var/cache/",
        b"var/cache/!first",
        b"var/cache/.wh..wh..opq",
        b"var/cache/fresh",
        b"var/lib/",
    ]
    by_name = {m.name: m for m in members}
    for name in (".wh.gone", "etc/.wh.removed.conf", "etc/.wh.also-gone", "var/cache/.wh..wh..opq"):
        whiteout = by_name[name]
        assert whiteout.isfile() and whiteout.size == 0, name
        assert (whiteout.mode, whiteout.uid, whiteout.gid) == (0o644, 0, 0)
    assert not any(m.ischr() or m.islnk() for m in members)
    assert "var/lib/.wh..wh..opq" not in by_name
    assert by_name["etc/kept.conf"].pax_headers == {"SCHILY.xattr.user.note": "stays"}
    for member in members:
        assert not any("trusted.overlay" in key for key in member.pax_headers)


def test_whiteout_clashing_with_a_real_file_is_refused(tmp_path):
    root = tmp_path / "upper"
    root.mkdir()
    os.mknod(root / "x", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (root / ".wh.x").write_text("")
    with pytest.raises(LayerError, match=r"\.wh\.x"):
        write(root, "none")


# ----------------------------------------------------------------------------- compress_stream


def test_compress_stream_recompresses_a_zstd_layer_as_gzip(tree):
    zstd_blob, zstd_data = write(tree, "zstd", source_date_epoch=EPOCH)
    tar_bytes = decompress(zstd_data, "zstd")

    outputs = []
    for _ in range(2):
        out = io.BytesIO()
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(zstd_data))
        outputs.append((compress_stream(reader, out, compression="gzip"), out.getvalue()))
    (gzip_blob, gzip_data), (again_blob, again_data) = outputs

    assert gzip_blob.diff_id == zstd_blob.diff_id
    assert gzip_blob.uncompressed_size == zstd_blob.uncompressed_size
    assert gzip_blob.media_type == MEDIA_TYPE_GZIP
    assert gzip_data == again_data and gzip_blob == again_blob
    assert gzip.decompress(gzip_data) == tar_bytes
    assert gzip_blob.digest == sha256(gzip_data) and gzip_blob.size == len(gzip_data)
    # streaming a tar gives exactly what write_layer gives for the same tree
    assert gzip_blob == write(tree, "gzip", source_date_epoch=EPOCH)[0]
    rezstd = compress_stream(io.BytesIO(tar_bytes), io.BytesIO(), compression="zstd")
    assert rezstd == zstd_blob


def test_compress_stream_none_is_a_hashed_copy():
    tar_bytes = b"not really a tar, any bytes will do" * 100_000
    out = io.BytesIO()
    blob = compress_stream(io.BytesIO(tar_bytes), out, compression="none")
    assert out.getvalue() == tar_bytes
    assert blob.digest == blob.diff_id == sha256(tar_bytes)
    assert blob.size == blob.uncompressed_size == len(tar_bytes)


def test_gzip_of_incompressible_and_text_data_round_trips():
    data = _random(3 * CHUNK_SIZE + 5, 3) + b"compressible text line\n" * 200_000
    out = io.BytesIO()
    blob = compress_stream(io.BytesIO(data), out, compression="gzip")
    assert gzip.decompress(out.getvalue()) == data
    assert blob.size < len(data) * 0.8
    assert subprocess.run(["gzip", "-t"], input=out.getvalue()).returncode == 0


# ----------------------------------------------------------------------------- errors


def test_unsupported_compression_is_refused(tree):
    with pytest.raises(LayerError, match="unsupported layer compression 'bzip2'"):
        write_layer(tree, io.BytesIO(), compression="bzip2")
    with pytest.raises(KilnError):
        compress_stream(io.BytesIO(b""), io.BytesIO(), compression="xz")


def test_missing_source_names_the_path(tmp_path):
    with pytest.raises(LayerError, match="nope"):
        write_layer(tmp_path / "nope", io.BytesIO())


def test_unreadable_directory_names_the_path(tmp_path):
    root = tmp_path / "t"
    (root / "locked").mkdir(parents=True)
    (root / "locked/secret").write_text("x")
    os.chown(root / "locked", 1234, 1234)
    os.chmod(root / "locked", 0o000)
    # root reads everything: drop the DAC override capabilities for the writer
    script = (
        "import io, sys\n"
        "from store.layer_writer import write_layer\n"
        "from store.errors import LayerError\n"
        "try:\n"
        f"    write_layer({str(root)!r}, io.BytesIO())\n"
        "except LayerError as err:\n"
        "    print(err)\n"
        "    sys.exit(3)\n"
    )
    result = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-all",
            sys.executable,
            "-c",
            script,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 3, result.stderr
    assert "locked" in result.stdout and "Permission denied" in result.stdout


def test_failing_output_raises_and_stops(tree):
    class Broken(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise OSError(28, "No space left on device")

    with pytest.raises(LayerError, match="No space left"):
        write_layer(tree, Broken(), compression="zstd")


def test_file_shrinking_or_growing_while_read_keeps_the_tar_valid(tmp_path):
    from store.layer_writer import _Pipeline, _TarCodec, tar_header

    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_RDONLY)
    out = io.BytesIO()
    pipeline = _Pipeline(out, _TarCodec())

    def produce(sink):
        for name, declared in ((b"shrank", 25), (b"grew", 4)):
            os.lseek(fd, 0, os.SEEK_SET)
            sink.write(tar_header(name, b"0", mode=0o644, uid=0, gid=0, size=declared, mtime=0))
            sink.copy_fd(fd, declared)
        sink.write(bytes(1024))

    try:
        pipeline.run(produce)
    finally:
        os.close(fd)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as archive:
        assert archive.extractfile("shrank").read() == b"0123456789" + bytes(15)
        assert archive.extractfile("grew").read() == b"0123"


def test_overlay_metacopy_and_redirect_are_refused(tmp_path):
    for xattr in ("trusted.overlay.metacopy", "trusted.overlay.redirect"):
        root = tmp_path / xattr
        (root / "d").mkdir(parents=True)
        os.setxattr(root / "d", xattr, b"/elsewhere" if xattr.endswith("redirect") else b"")
        with pytest.raises(LayerError, match=xattr):
            write(root, "none")


def test_output_taking_few_bytes_per_call_still_gets_everything(tree):
    class Trickle(io.RawIOBase):
        def __init__(self):
            self.data = bytearray()

        def writable(self):
            return True

        def write(self, data):
            self.data += bytes(data[:1000])
            return min(len(data), 1000)

    out = Trickle()
    blob = write_layer(tree, out, compression="zstd")
    assert blob.size == len(out.data) and blob.digest == sha256(bytes(out.data))


@pytest.mark.parametrize(
    ("compression", "level"), [("zstd", 0), ("zstd", 23), ("gzip", 10), ("none", 1)]
)
def test_bad_levels_are_refused(tree, compression, level):
    with pytest.raises(LayerError, match="level"):
        write_layer(tree, io.BytesIO(), compression=compression, level=level)


def test_levels_change_the_output_but_not_the_diff_id(tree):
    fast, _ = write(tree, "zstd", level=1)
    default, _ = write(tree, "zstd")
    assert fast.diff_id == default.diff_id and fast.digest != default.digest
    assert write(tree, "gzip", level=9)[0].diff_id == default.diff_id


@pytest.mark.parametrize("extra_blocks", [-1, 0, 1])
@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_layers_around_one_chunk_match_compress_stream(tmp_path, compression, extra_blocks):
    # Streams shorter than one chunk are compressed in the caller's thread, longer ones
    # by the pipeline: both paths must agree with compress_stream and decompress right.
    root = tmp_path / "tree"
    root.mkdir()
    # header + data + end-of-archive blocks = CHUNK_SIZE + extra_blocks * 512
    (root / "f").write_bytes(os.urandom(CHUNK_SIZE - 1536 + extra_blocks * 512))
    blob, data = write(root, compression)
    tar_bytes = decompress(data, compression)
    assert len(tar_bytes) == blob.uncompressed_size == CHUNK_SIZE + extra_blocks * 512
    assert blob.diff_id == sha256(tar_bytes) and blob.digest == sha256(data)
    again = compress_stream(io.BytesIO(tar_bytes), io.BytesIO(), compression=compression)
    assert again == blob
    assert write(root, compression, threads=1)[0] == blob


def test_opaque_upper_root_gives_a_top_level_opaque_whiteout(tmp_path):
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "only").write_text("x")
    os.setxattr(upper, "trusted.overlay.opaque", b"y")
    names = [m.name for m in raw_members(write(upper, "none")[1])]
    assert names == [".wh..wh..opq", "only"]
