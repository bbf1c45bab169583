"""Hostile layer tarballs: each is refused with a LayerError naming the layer and
the entry (or extracted safely where that is the right answer), the layer dir is
gone after a refusal, and nothing outside the layer dir changes."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pathlib
import stat
import time
import tracemalloc
import zlib

import pytest
import zstandard

from store.errors import LayerError
from store.layer_extract import DEFAULT_LIMITS, ExtractLimits, extract_layer
from tests.store import tarcraft as tc

LAYER = "sha256:" + "ab" * 32
TAR = "application/vnd.oci.image.layer.v1.tar"
GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
ZST = "application/vnd.oci.image.layer.v1.tar+zstd"
OUTSIDE_FILES = ("/etc/passwd", "/etc/shadow", "/etc/hostname")


class World:
    """tmp_path with a victim dir and a tmp-like dir; dest = tmp_path/store/dest,
    so ``../../victim`` from inside dest names the real victim dir."""

    def __init__(self, root):
        self.root = root
        self.victim = root / "victim"
        (self.victim / "sub").mkdir(parents=True)
        (self.victim / "secret").write_bytes(b"s3cret")
        os.chmod(self.victim / "secret", 0o600)
        (self.victim / "sub" / "file").write_bytes(b"sub file")
        os.symlink("secret", self.victim / "link")
        (root / "tmp").mkdir()
        (root / "tmp" / "sentinel").write_bytes(b"sentinel")
        (root / "etc").mkdir()  # stands in for /etc: a broken extractor must not hit the real one
        (root / "etc" / "passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
        (root / "store").mkdir()
        self.dest = root / "store" / "dest"
        self.vb = os.fsencode(self.victim)  # absolute victim path, for symlink targets
        self.rb = os.fsencode(root)
        self._before = None
        self._outside = None

    def snap(self):
        s = tc.snapshot(self.root, exclude=(str(self.dest),))
        # creating (and removing) dest changes its parent's mtime and link count, nothing else
        s["store"].pop("mtime_ns")
        s["store"].pop("nlink")
        return s

    def remember(self):
        self._before = self.snap()
        self._outside = {p: tc.file_state(p) for p in OUTSIDE_FILES}

    def assert_untouched(self):
        assert self.snap() == self._before
        assert {p: tc.file_state(p) for p in OUTSIDE_FILES} == self._outside

    def extract(self, data: bytes, media_type: str = TAR, **kw):
        kw.setdefault("expected_diff_id", None)
        kw.setdefault("layer_digest", LAYER)
        return extract_layer(io.BytesIO(data), media_type, self.dest, **kw)


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


def refused(world: World, data: bytes, media_type: str = TAR, **kw) -> LayerError:
    world.remember()
    with pytest.raises(LayerError) as info:
        world.extract(data, media_type, **kw)
    err = info.value
    assert err.layer == LAYER and LAYER in str(err)
    assert not os.path.lexists(world.dest), "a refused layer must leave no directory"
    world.assert_untouched()
    return err


def extracted(world: World, data: bytes, media_type: str = TAR, **kw):
    world.remember()
    result = world.extract(data, media_type, **kw)
    world.assert_untouched()
    return result


def _pax_file(path: bytes, data: bytes = b"x") -> bytes:
    return tc.pax([(b"path", path)]) + tc.file(b"placeholder", data)


def _gnu_sparse_header(name: bytes, realsize: int, regions: list[tuple[int, int]],
                       stored: int) -> bytes:
    """Old GNU sparse ('S') header; the sparse map lives at offset 386."""
    block = bytearray(tc.header(name, typeflag=b"S", size=stored, magic=b"ustar  \0"))
    for i, (off, n) in enumerate(regions[:4]):
        block[386 + 24 * i : 386 + 24 * i + 24] = tc.octal(off, 12) + tc.octal(n, 12)
    block[483:495] = tc.base256(realsize, 12)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


# a name no one else uses, for the cases that aim at the real / (checked to stay absent)
UNIQUE = f"kiln-hostile-test-{os.getpid()}-{os.urandom(4).hex()}"

# (id, builder(world) -> tar bytes, offending entry, words in the message)
REFUSED = [
    ("dotdot", lambda w: tc.tar(tc.file(b"../../x", b"pwned")), "../../x", "'..'"),
    ("abs", lambda w: tc.tar(tc.file(b"/abs/x", b"pwned")), "/abs/x", "absolute"),
    ("abs-dotdot", lambda w: tc.tar(tc.file(b"/../x")), "/../x", "absolute"),
    ("inner-dotdot", lambda w: tc.tar(tc.file(b"a/../../victim/secret", b"pwned")),
     "a/../../victim/secret", "'..'"),
    ("dotdot-pax-path", lambda w: tc.tar(_pax_file(b"../../victim/secret", b"pwned")),
     "../../victim/secret", "'..'"),
    ("symlink-etc-then-passwd",
     lambda w: tc.tar(tc.symlink(b"a", w.rb + b"/etc"), tc.file(b"a/passwd", b"pwned")),
     "a/passwd", "symlink"),
    ("symlink-real-etc-then-child",
     lambda w: tc.tar(tc.symlink(b"a", b"/etc"), tc.file(b"a/" + UNIQUE.encode(), b"x")),
     "a/" + UNIQUE, "symlink"),
    ("symlink-victim-then-child",
     lambda w: tc.tar(tc.symlink(b"a", w.vb), tc.file(b"a/secret", b"pwned")),
     "a/secret", "symlink"),
    ("symlink-up-then-child",
     lambda w: tc.tar(tc.symlink(b"d", b"../../.."), tc.file(b"d/x", b"pwned")),
     "d/x", "symlink"),
    ("symlink-chain",
     lambda w: tc.tar(tc.symlink(b"a", b"b"), tc.symlink(b"b", b"../.."),
                      tc.file(b"a/x", b"pwned")),
     "a/x", "symlink"),
    ("symlink-chain-victim",
     lambda w: tc.tar(tc.symlink(b"a", b"b"), tc.symlink(b"b", b"../../victim"),
                      tc.file(b"a/secret", b"pwned")),
     "a/secret", "symlink"),
    ("symlink-dot", lambda w: tc.tar(tc.symlink(b".", b"/")), ".", "root"),
    ("symlink-dot-slash", lambda w: tc.tar(tc.symlink(b"./", w.vb)), "./", "root"),
    ("symlink-abs-dot", lambda w: tc.tar(tc.symlink(b"/.", b"/")), "/.", "absolute"),
    ("symlink-root-then-tmp",
     lambda w: tc.tar(tc.symlink(b"foo", b"/"), tc.file(b"foo/tmp/" + UNIQUE.encode(), b"x")),
     "foo/tmp/" + UNIQUE, "symlink"),
    ("symlink-world-root-then-tmp",
     lambda w: tc.tar(tc.symlink(b"foo", w.rb), tc.file(b"foo/tmp/sentinel", b"pwned")),
     "foo/tmp/sentinel", "symlink"),
    ("symlink-then-dir-child",
     lambda w: tc.tar(tc.symlink(b"foo", w.vb), tc.directory(b"foo/sub/")),
     "foo/sub/", "symlink"),
    ("dir-replaced-by-symlink-then-child",  # the cached fd of d must not be reused
     lambda w: tc.tar(tc.directory(b"d/"), tc.file(b"d/a", b"a"), tc.symlink(b"d", w.vb),
                      tc.file(b"d/secret", b"pwned")),
     "d/secret", "symlink"),
    ("dir-whited-out-then-child",
     lambda w: tc.tar(tc.directory(b"d/"), tc.file(b"d/a", b"a"), tc.file(b".wh.d"),
                      tc.file(b"d/b", b"b")),
     "d/b", "not a directory"),
    ("hardlink-to-symlink-then-child",
     lambda w: tc.tar(tc.symlink(b"l", w.vb), tc.hardlink(b"h", b"l"),
                      tc.file(b"h/secret", b"pwned")),
     "h/secret", "symlink"),
    ("hardlink-etc-shadow", lambda w: tc.tar(tc.hardlink(b"h", b"/etc/shadow")), "h", "absolute"),
    ("hardlink-victim", lambda w: tc.tar(tc.hardlink(b"h", b"../victim")), "h", "'..'"),
    ("hardlink-victim-file",
     lambda w: tc.tar(tc.hardlink(b"h", b"../../victim/secret")), "h", "'..'"),
    ("hardlink-through-symlink",
     lambda w: tc.tar(tc.symlink(b"l", w.vb), tc.hardlink(b"h", b"l/secret")), "h", "symlink"),
    ("hardlink-then-chmod-outside",
     lambda w: tc.tar(tc.hardlink(b"h", b"../../victim/secret"),
                      tc.file(b"h", b"pwned", mode=0o777)), "h", "'..'"),
    ("hardlink-missing", lambda w: tc.tar(tc.hardlink(b"h", b"nope")), "h", "not an entry"),
    ("hardlink-to-dir",
     lambda w: tc.tar(tc.directory(b"d/"), tc.hardlink(b"h", b"d")), "h", "directory"),
    ("hardlink-to-itself", lambda w: tc.tar(tc.file(b"h"), tc.hardlink(b"h", b"h")), "h",
     "itself"),
    ("whiteout-dot", lambda w: tc.tar(tc.file(b".wh..")), ".wh..", "names no file"),
    ("whiteout-dotdot", lambda w: tc.tar(tc.file(b".wh...")), ".wh...", "names no file"),
    ("whiteout-bare", lambda w: tc.tar(tc.file(b".wh.")), ".wh.", "names no file"),
    ("whiteout-dotdot-in-dir", lambda w: tc.tar(tc.file(b"d/.wh...")), "d/.wh...",
     "names no file"),
    ("whiteout-aufs-meta", lambda w: tc.tar(tc.file(b".wh..wh.plnk")), ".wh..wh.plnk", "AUFS"),
    ("whiteout-through-symlink",
     lambda w: tc.tar(tc.symlink(b"l", w.vb), tc.file(b"l/.wh.secret")), "l/.wh.secret", "symlink"),
    ("opaque-through-symlink",
     lambda w: tc.tar(tc.symlink(b"l", w.vb), tc.file(b"l/.wh..wh..opq")), "l/.wh..wh..opq",
     "symlink"),
    ("parent-is-file",
     lambda w: tc.tar(tc.file(b"f", b"x"), tc.file(b"f/child", b"y")), "f/child",
     "not a directory"),
    ("nul-in-pax-path", lambda w: tc.tar(_pax_file(b"a\0/../../x")), "a\0/../../x", "NUL"),
    ("nul-in-gnu-long-name",
     lambda w: tc.tar(tc.gnu_long(b"a\0b"), tc.file(b"x")), "a\0b", "NUL"),
    ("nul-in-symlink-target",
     lambda w: tc.tar(tc.pax([(b"linkpath", b"a\0b")]), tc.symlink(b"s", b"x")), "s", "NUL"),
    ("empty-name", lambda w: tc.tar(tc.file(b"", b"x")), "", "empty"),
    ("empty-symlink-target", lambda w: tc.tar(tc.symlink(b"s", b"")), "s", "empty target"),
    ("component-too-long", lambda w: tc.tar(_pax_file(b"d/" + b"a" * 256)), "d/" + "a" * 256,
     "longer than 255"),
    ("path-too-long", lambda w: tc.tar(_pax_file(b"d/" * 2100 + b"f")), "d/" * 2100 + "f",
     "longer than 4096"),
    ("bad-checksum", lambda w: tc.tar(tc.header(b"f", checksum=12345)), "f", "checksum"),
    ("bad-octal", lambda w: tc.tar(tc.header(b"f", size_field=b"12x4\0" + b"\0" * 7)), "f",
     "invalid octal"),
    ("size-beyond-stream",
     lambda w: tc.header(b"f", size=1 << 20) + b"only a little data" + b"\0" * 1006, "f",
     "truncated"),
    ("no-end-marker", lambda w: tc.file(b"f", b"data"), None, "end-of-archive"),
    ("partial-block", lambda w: tc.file(b"f", b"data")[:700], "f", "truncated"),
    ("unknown-type", lambda w: tc.tar(tc.header(b"f", typeflag=b"Z")), "f", "unknown tar entry"),
    ("multivolume", lambda w: tc.tar(tc.header(b"f", typeflag=b"M")), "f", "multi-volume"),
    ("malformed-pax", lambda w: tc.tar(tc.member(b"p", b"99 path=x\n", typeflag=b"x"),
                                      tc.file(b"f")), "p", "malformed PAX"),
    ("negative-size", lambda w: tc.tar(tc.header(b"f", size_field=tc.base256(-5, 12))), "f",
     "negative size"),
    ("sparse-1tib-pax",
     lambda w: tc.tar(tc.pax([(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
                              (b"GNU.sparse.name", b"big"),
                              (b"GNU.sparse.realsize", b"%d" % (1 << 40))]),
                      tc.file(b"GNUSparseFile.0/big", tc.pad(b"1\n%d\n4\n" % ((1 << 40) - 4))
                              + b"tail")),
     "big", "max_total_bytes"),
    ("sparse-1tib-gnu",
     lambda w: tc.tar(_gnu_sparse_header(b"big", 1 << 40, [((1 << 40) - 4, 4)], 4)
                      + tc.pad(b"tail")),
     "big", "max_total_bytes"),
    ("sparse-map-out-of-range",
     lambda w: tc.tar(tc.pax([(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
                              (b"GNU.sparse.name", b"s"), (b"GNU.sparse.realsize", b"10")]),
                      tc.file(b"GNUSparseFile.0/s", tc.pad(b"1\n8\n4\n") + b"tail")),
     "s", "out-of-range"),
]


@pytest.mark.parametrize(
    "build,entry,words", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_hostile_entry_is_refused(world, build, entry, words):
    err = refused(world, build(world))
    assert not os.path.lexists("/etc/" + UNIQUE) and not os.path.lexists("/tmp/" + UNIQUE)
    assert words in str(err)
    assert err.entry == entry


def test_hostile_entry_refused_in_every_compression(world):
    data = tc.tar(tc.symlink(b"a", world.vb), tc.file(b"a/secret", b"pwned"))
    for media_type, blob in (
        (GZ, gzip.compress(data)),
        (ZST, zstandard.ZstdCompressor().compress(data)),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", data),
    ):
        err = refused(world, blob, media_type)
        assert err.entry == "a/secret"


def test_symlink_dot_refused_then_next_layer_safe(world):
    """A '.' symlink cannot replace the layer root; a second layer using the same
    names extracts normally into its own dir and escapes nowhere."""
    refused(world, tc.tar(tc.symlink(b".", world.vb)))
    second = tc.tar(tc.directory(b"./"), tc.file(b"secret", b"layer two"))
    extracted(world, second)
    assert (world.dest / "secret").read_bytes() == b"layer two"
    assert (world.victim / "secret").read_bytes() == b"s3cret"


# --------------------------------------------------------------------------- safe successes


def test_hardlink_then_chmod_changes_only_the_layer_inode(world):
    data = tc.tar(
        tc.file(b"f", b"original", mode=0o644),
        tc.hardlink(b"h", b"f"),
        tc.file(b"h", b"replaced", mode=0o777),
    )
    extracted(world, data)
    f, h = os.lstat(world.dest / "f"), os.lstat(world.dest / "h")
    assert stat.S_IMODE(f.st_mode) == 0o644 and f.st_nlink == 1
    assert (world.dest / "f").read_bytes() == b"original"
    assert stat.S_IMODE(h.st_mode) == 0o777 and h.st_nlink == 1
    assert (world.dest / "h").read_bytes() == b"replaced"


def test_hardlink_to_in_layer_file_shares_the_inode(world):
    extracted(world, tc.tar(tc.file(b"d/f", b"data"), tc.hardlink(b"e/h", b"d/f")))
    assert os.lstat(world.dest / "d/f").st_ino == os.lstat(world.dest / "e/h").st_ino


def test_whiteout_of_symlink_replaces_it_and_follows_nothing(world):
    data = tc.tar(tc.symlink(b"l", world.vb + b"/secret"), tc.file(b".wh.l"))
    extracted(world, data)
    st = os.lstat(world.dest / "l")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert (world.victim / "secret").read_bytes() == b"s3cret"


def test_whiteout_of_symlinked_dir_removes_only_the_symlink(world):
    data = tc.tar(tc.symlink(b"l", world.vb), tc.file(b".wh.l"))
    extracted(world, data)
    assert stat.S_ISCHR(os.lstat(world.dest / "l").st_mode)
    assert sorted(os.listdir(world.victim)) == ["link", "secret", "sub"]


def test_whiteout_of_directory_in_same_layer(world):
    data = tc.tar(tc.directory(b"d/"), tc.file(b"d/f", b"x"), tc.file(b".wh.d"))
    extracted(world, data)
    st = os.lstat(world.dest / "d")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and stat.S_IMODE(st.st_mode) == 0


@pytest.mark.parametrize("marker_first", [True, False])
def test_opaque_dir_keeps_files_of_the_same_layer(world, marker_first):
    marker = tc.file(b"d/.wh..wh..opq")
    readded = tc.file(b"d/f", b"re-added")
    parts = [tc.directory(b"d/")] + ([marker, readded] if marker_first else [readded, marker])
    extracted(world, tc.tar(*parts))
    assert os.getxattr(world.dest / "d", "trusted.overlay.opaque") == b"y"
    assert (world.dest / "d/f").read_bytes() == b"re-added"
    assert os.listdir(world.dest / "d") == ["f"]


def _all_xattrs(root):
    found = {}
    for top, dirs, files in os.walk(root):
        for name in [top] + [os.path.join(top, n) for n in dirs + files]:
            for attr in os.listxattr(name, follow_symlinks=False):
                found[(os.path.relpath(name, root), attr)] = os.getxattr(
                    name, attr, follow_symlinks=False
                )
    return found


def test_overlay_xattrs_in_the_tar_are_dropped(world):
    evil = [
        (b"SCHILY.xattr.trusted.overlay.opaque", b"y"),
        (b"SCHILY.xattr.trusted.overlay.redirect", b"/victim"),
        (b"SCHILY.xattr.trusted.overlay.origin", b"\x00\x01"),
        (b"SCHILY.xattr.user.overlay.opaque", b"y"),
        (b"SCHILY.xattr.user.kept", b"1"),
    ]
    data = tc.tar(
        tc.pax(evil), tc.directory(b"d/"),
        tc.pax(evil), tc.file(b"d/f", b"x"),
    )
    extracted(world, data)
    assert _all_xattrs(world.dest) == {("d", "user.kept"): b"1", ("d/f", "user.kept"): b"1"}


def test_duplicate_paths_later_wins_and_nothing_escapes(world):
    data = tc.tar(
        tc.file(b"f", b"first"),
        tc.file(b"f", b"second", mode=0o600),
        tc.symlink(b"s", world.vb + b"/secret"),
        tc.file(b"s", b"pwned?"),  # replaces the symlink, never writes through it
        tc.symlink(b"v", world.vb),
        tc.directory(b"v/"),  # a real directory replaces the symlink
        tc.file(b"v/inside", b"in layer"),
        tc.directory(b"d/"),
        tc.file(b"d/child", b"c"),
        tc.file(b"d", b"now a file"),  # replaces the directory and its child
        tc.file(b"g", b"file"),
        tc.directory(b"g/"),
        tc.file(b"g/child", b"c"),
        tc.file(b"h", b"x"),
        tc.symlink(b"h", b"/etc/shadow"),  # a symlink replaces the file; target kept verbatim
    )
    extracted(world, data)
    d = world.dest
    assert (d / "f").read_bytes() == b"second" and stat.S_IMODE(os.lstat(d / "f").st_mode) == 0o600
    assert stat.S_ISREG(os.lstat(d / "s").st_mode) and (d / "s").read_bytes() == b"pwned?"
    assert stat.S_ISDIR(os.lstat(d / "v").st_mode) and os.listdir(d / "v") == ["inside"]
    assert (d / "d").read_bytes() == b"now a file"
    assert os.listdir(d / "g") == ["child"]
    assert os.readlink(d / "h") == "/etc/shadow"
    assert (world.victim / "secret").read_bytes() == b"s3cret"
    assert sorted(os.listdir(world.victim)) == ["link", "secret", "sub"]


def test_non_utf8_names_round_trip(world):
    name = b"caf\xe9/\xff\xfe-name.txt"
    pax_name = b"dir/\x80\x81 pax"
    data = tc.tar(
        tc.file(name, b"latin-1"),
        tc.pax([(b"hdrcharset", b"BINARY"), (b"path", pax_name)]), tc.file(b"x", b"pax"),
        tc.symlink(b"ln", b"\xe9\xe9"),
    )
    extracted(world, data)
    root = os.fsencode(world.dest)
    assert pathlib.Path(os.fsdecode(os.path.join(root, name))).read_bytes() == b"latin-1"
    assert pathlib.Path(os.fsdecode(os.path.join(root, pax_name))).read_bytes() == b"pax"
    assert os.readlink(os.path.join(root, b"ln")) == b"\xe9\xe9"


def test_symlink_targets_are_stored_verbatim(world):
    data = tc.tar(tc.symlink(b"a", b"/etc/shadow"), tc.symlink(b"b", b"../../../../victim"),
                  tc.symlink(b"c", b"."))
    extracted(world, data)
    assert os.readlink(world.dest / "a") == "/etc/shadow"
    assert os.readlink(world.dest / "b") == "../../../../victim"
    assert os.readlink(world.dest / "c") == "."


# --------------------------------------------------------------------------- streams and limits


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True).compress(data)


@pytest.mark.parametrize("cut", [1, 4, 100, "half"])
def test_truncated_gzip_is_refused(world, cut):
    payload = tc.tar(tc.file(b"f", os.urandom(200_000)), tc.file(b"g", b"y" * 5000))
    blob = gzip.compress(payload)
    blob = blob[: len(blob) // 2] if cut == "half" else blob[:-cut]
    err = refused(world, blob, GZ)
    assert "truncated" in str(err) or "gzip" in str(err)


@pytest.mark.parametrize("cut", [1, 4, 100, "half"])
def test_truncated_zstd_is_refused(world, cut):
    payload = tc.tar(tc.file(b"f", os.urandom(200_000)), tc.file(b"g", b"y" * 5000))
    blob = _zstd(payload)
    blob = blob[: len(blob) // 2] if cut == "half" else blob[:-cut]
    err = refused(world, blob, ZST)
    assert "truncated" in str(err) or "zstd" in str(err)


def test_truncated_zstd_without_checksum_is_refused(world):
    blob = zstandard.ZstdCompressor(write_checksum=False).compress(tc.tar(tc.file(b"f", b"x")))
    err = refused(world, blob[:-2], ZST)
    assert "truncated" in str(err)


def test_gzip_trailing_garbage_is_refused(world):
    blob = gzip.compress(tc.tar(tc.file(b"f", b"x"))) + b"garbage!"
    assert "garbage" in str(refused(world, blob, GZ))


def test_gzip_bomb_stops_at_the_limit_with_bounded_memory(world):
    member = gzip.compress(b"\0" * (64 << 20), compresslevel=9)
    blob = member * 64  # ~4 GiB of zeros in a few MiB of concatenated gzip members
    assert len(blob) < 8 << 20
    limits = ExtractLimits(**{**DEFAULT_LIMITS.__dict__, "max_total_bytes": 256 << 20})
    tracemalloc.start()
    t = time.monotonic()
    try:
        err = refused(world, blob, GZ, limits=limits)
        elapsed = time.monotonic() - t
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "max_total_bytes" in str(err)
    assert elapsed < 20
    assert peak - len(blob) < 64 << 20, f"peak Python memory {peak >> 20} MiB"


def test_file_bigger_than_limit_is_refused_before_reading(world):
    limits = ExtractLimits(**{**DEFAULT_LIMITS.__dict__, "max_total_bytes": 1 << 20})
    data = tc.tar(tc.file(b"small", b"x" * 1000), tc.header(b"big", size=2 << 20))
    err = refused(world, data, limits=limits)
    assert err.entry == "big" and "max_total_bytes" in str(err)


def test_zstd_window_log_31_is_refused(world):
    payload = tc.tar(tc.file(b"f", b"x"))
    frame = (
        b"\x28\xb5\x2f\xfd"
        + bytes([0x00])  # no content size, not single segment, no checksum, no dict
        + bytes([(31 - 10) << 3])  # window descriptor: window log 31
        + ((len(payload) << 3) | 1).to_bytes(3, "little")  # last block, raw
        + payload
    )
    err = refused(world, frame, ZST)
    assert "window" in str(err)


def test_wrong_diff_id_is_refused(world):
    data = tc.tar(tc.file(b"f", b"content"))
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    err = refused(world, data, expected_diff_id=wrong)
    assert "diff_id mismatch" in str(err)


def test_a_million_entries_are_refused_by_default(world):
    assert DEFAULT_LIMITS.max_entries < 1_000_000
    block = tc.directory(b"./")
    cobj = zstandard.ZstdCompressor(level=1).compressobj()
    chunk = block * 2048
    parts = [cobj.compress(chunk) for _ in range(1_000_000 // 2048)]
    parts.append(cobj.compress(block * (1_000_000 % 2048) + tc.end()))
    parts.append(cobj.flush())
    blob = b"".join(parts)
    t = time.monotonic()
    err = refused(world, blob, ZST)
    assert "max_entries" in str(err) and err.entry == "./"
    assert time.monotonic() - t < 30


def test_huge_pax_header_fails_fast_without_reading_it(world):
    size = 100 << 20
    cobj = zstandard.ZstdCompressor(level=1).compressobj()
    parts = [cobj.compress(tc.header(b"././@PaxHeader", typeflag=b"x", size=size))]
    record = b"%d path=" % size
    parts.append(cobj.compress(record))
    zeros = b"a" * (1 << 20)
    for _ in range(size >> 20):
        parts.append(cobj.compress(zeros))
    parts.append(cobj.compress(tc.file(b"f") + tc.end()))
    parts.append(cobj.flush())
    blob = b"".join(parts)
    tracemalloc.start()
    t = time.monotonic()
    try:
        err = refused(world, blob, ZST)
        elapsed = time.monotonic() - t
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "extended header" in str(err) and err.entry == "././@PaxHeader"
    assert elapsed < 5
    assert peak - len(blob) < 48 << 20, f"peak Python memory {peak >> 20} MiB"


def test_many_small_pax_headers_are_bounded_together(world):
    one = tc.pax([(b"comment", b"c" * 600_000)])
    err = refused(world, tc.tar(one, one, tc.file(b"f")))
    assert "extended header" in str(err)


def test_deflate_zlib_wrapper_is_not_taken_for_gzip(world):
    blob = zlib.compress(tc.tar(tc.file(b"f")))
    refused(world, blob, GZ)


def test_unknown_media_type_is_refused(world):
    err = refused(world, tc.tar(tc.file(b"f")), "application/x-tar")
    assert "media type" in str(err)
