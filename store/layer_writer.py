"""The deterministic layer tar writer.

``write_layer`` turns a directory (a plain rootfs or an overlayfs upper dir) into an OCI
layer blob: a sorted PAX tar, compressed with zstd or gzip, with the diff_id and the blob
digest computed in the same streaming pass. The same tree with the same epoch and the same
compression gives the same bytes, whatever the inode numbers, creation order, thread count
or machine load.

The tar: entries in byte order of their tar names (relative, no "./", directories ending
in "/", no entry for the root); ustar headers, with a PAX 'x' header (named
"././@PaxHeader") only for what ustar cannot hold: long or non-ASCII names and link
targets (hdrcharset=BINARY when not UTF-8), big ids/sizes, out-of-range mtimes, xattrs
(SCHILY.xattr.*, never trusted.overlay.*). Empty uname/gname, whole-second mtimes, two
zero blocks at the end and no record padding. Regular files sharing an inode become
hardlinks to the first of them in that order. Sockets are skipped. Overlay whiteouts
become empty regular files (mode 0644, owner 0:0) named ``.wh.<name>`` and
``<dir>/.wh..wh..opq``.

The stream is made by three stages that overlap:

* the calling thread walks the tree, fills fixed-size buffers with headers and file data
  (read straight into the buffer, many small files per buffer) and hashes them (diff_id);
* a compress thread feeds the compressor (zstd has its own worker threads; gzip chunks
  are deflated in a small thread pool);
* a write thread hashes the compressed bytes (digest) and writes them to ``out``.

hashlib, zlib, zstandard and file I/O all release the GIL on large buffers, so the
stages really do run in parallel. A stream shorter than one buffer is done in the
calling thread alone.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import stat
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from store.errors import KilnError, LayerError
from store.fsutil import is_overlay_xattr, overlay_xattr_prefix

MEDIA_TYPE_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_TYPE_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_TAR = "application/vnd.oci.image.layer.v1.tar"

_MEDIA_TYPES = {"zstd": MEDIA_TYPE_ZSTD, "gzip": MEDIA_TYPE_GZIP, "none": MEDIA_TYPE_TAR}

ZSTD_DEFAULT_LEVEL = 3
# Level 4, not zlib's 6: measured on Python sources and on /usr/bin, level 6 is 2.0-2.2x
# slower than 4 for output only 5-8% smaller (level 1 is another ~1.5x faster but 10-15%
# bigger). gzip is what a push to an old registry pays for, on every layer.
# Incompressible chunks skip deflate altogether (see _deflate_chunk).
GZIP_DEFAULT_LEVEL = 4

# Size of the buffers the tar stream is cut into.  gzip output depends on it (each chunk
# is deflated on its own), so changing it changes gzip digests: treat it as a format
# constant.
CHUNK_SIZE = 2 << 20
# Pinned rather than left to zstd's default so the stream layout cannot drift with the
# library's heuristics (8 MiB is what zstd picks for level 3 today).
ZSTD_JOB_SIZE = 8 << 20
_ZSTD_WRITE_SIZE = 1 << 20
_BUFFER_COUNT = 12
_QUEUE_DEPTH = 4
_OUT_QUEUE_DEPTH = 6

_BLOCK = 512
_ZEROS = bytes(CHUNK_SIZE)
_ZERO_VIEW = memoryview(_ZEROS)
_END_OF_ARCHIVE = bytes(2 * _BLOCK)

_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# An upper dir using these overlay features is not a self-contained diff: a metacopy file
# has its data in a lower layer, a redirected dir is a renamed lower dir.
_OVERLAY_UNSUPPORTED = ("metacopy", "redirect")
_WHITEOUT_PREFIX = b".wh."
_OPAQUE_WHITEOUT = b".wh..wh..opq"
_WHITEOUT_MODE = 0o644

_MAX_OCTAL_7 = 0o7777777
_MAX_OCTAL_11 = 0o77777777777

# ustar header: name, the five numeric fields (mode uid gid size mtime), chksum,
# typeflag, linkname, magic+version, uname, gname, devmajor+devminor, prefix, padding.
_USTAR = struct.Struct("100s48s8sc100s8s32s32s16s155s12x")
_MAGIC = b"ustar\x0000"
_NO_DEVICE = b"0000000\x000000000\x00"
_CHECKSUM_CONST = 8 * ord(" ") + sum(_MAGIC)

_REGTYPE = b"0"
_LNKTYPE = b"1"
_SYMTYPE = b"2"
_CHRTYPE = b"3"
_BLKTYPE = b"4"
_DIRTYPE = b"5"
_FIFOTYPE = b"6"
_PAXTYPE = b"x"
_PAX_HEADER_NAME = b"././@PaxHeader"


@dataclass(frozen=True)
class LayerBlob:
    media_type: str
    digest: str  # "sha256:<hex>" of the bytes written to `out` (compressed)
    size: int  # bytes written to `out`
    diff_id: str  # "sha256:<hex>" of the uncompressed tar stream
    uncompressed_size: int


def write_layer(
    source: str | os.PathLike,
    out: BinaryIO,
    *,
    compression: str = "zstd",
    source_date_epoch: int | None = None,
    level: int | None = None,
    threads: int | None = None,
) -> LayerBlob:
    """Write the layer blob for the tree ``source`` to ``out`` and return its descriptor.

    ``threads`` is the number of compression workers (default: one per CPU); the output
    does not depend on it.
    """
    codec = _make_codec(compression, level, threads)
    root = os.fsencode(os.path.abspath(source))
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise LayerError(
            f"cannot open layer source directory {os.fsdecode(root)!r}: {err.strerror}"
        ) from err
    try:
        pipeline = _Pipeline(out, codec)
        pipeline.run(lambda sink: _TreeWriter(root, sink, source_date_epoch).write(root_fd))
    finally:
        os.close(root_fd)
    return pipeline.result(compression)


def compress_stream(
    src: BinaryIO,
    out: BinaryIO,
    *,
    compression: str,
    level: int | None = None,
    threads: int | None = None,
) -> LayerBlob:
    """Compress an uncompressed tar stream ``src`` into ``out`` (same rules as write_layer)."""
    codec = _make_codec(compression, level, threads)
    pipeline = _Pipeline(out, codec)
    pipeline.run(lambda sink: sink.copy_stream(src))
    return pipeline.result(compression)


# --------------------------------------------------------------------------- tar headers


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + len(str(len(body)))
    if len(str(length)) + len(body) != length:
        length += 1
    return b"%d" % length + body


def _split_ustar_name(name: bytes) -> tuple[bytes, bytes] | None:
    """(prefix, name) for the ustar fields, or None when the name needs a PAX path."""
    if len(name) <= 100:
        return b"", name
    if len(name) > 256:
        return None
    cut = name.find(b"/", len(name) - 101)
    if cut == -1 or cut > 155 or cut == len(name) - 1 or cut == 0:
        return None
    return name[:cut], name[cut + 1 :]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _ustar_header(
    name: bytes,
    prefix: bytes,
    typeflag: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    linkname: bytes,
    devices: bytes,
) -> bytes:
    numbers = b"%07o\x00%07o\x00%07o\x00%011o\x00%011o\x00" % (mode, uid, gid, size, mtime)
    checksum = (
        _CHECKSUM_CONST
        + sum(name)
        + sum(numbers)
        + typeflag[0]
        + sum(linkname)
        + sum(devices)
        + sum(prefix)
    )
    return _USTAR.pack(
        name,
        numbers,
        b"%06o\x00 " % checksum,
        typeflag,
        linkname,
        _MAGIC,
        b"",
        b"",
        devices,
        prefix,
    )


def tar_header(
    name: bytes,
    typeflag: bytes,
    *,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    linkname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
    xattrs: list[tuple[bytes, bytes]] | tuple = (),
) -> bytes:
    """The header block(s) of one entry: a ustar header, preceded by a PAX 'x' entry
    only when some value does not fit ustar (or there are xattrs)."""
    if devmajor or devminor:
        if devmajor > _MAX_OCTAL_7 or devminor > _MAX_OCTAL_7:
            raise LayerError("device number too large for a tar header", entry=os.fsdecode(name))
        devices = b"%07o\x00%07o\x00" % (devmajor, devminor)
    else:
        devices = _NO_DEVICE
    split = _split_ustar_name(name) if name.isascii() else None
    link_fits = not linkname or (len(linkname) <= 100 and linkname.isascii())
    if (
        split is not None
        and link_fits
        and not xattrs
        and uid <= _MAX_OCTAL_7
        and gid <= _MAX_OCTAL_7
        and size <= _MAX_OCTAL_11
        and 0 <= mtime <= _MAX_OCTAL_11
    ):
        prefix, short = split
        return _ustar_header(
            short, prefix, typeflag, mode, uid, gid, size, mtime, linkname, devices
        )

    records = []
    if (split is None and not _is_utf8(name)) or (not link_fits and not _is_utf8(linkname)):
        records.append(_pax_record(b"hdrcharset", b"BINARY"))
    if split is None:
        records.append(_pax_record(b"path", name))
        split = (b"", bytes(c if c < 128 else 0x5F for c in name[:100]))
    if not link_fits:
        records.append(_pax_record(b"linkpath", linkname))
        linkname = bytes(c if c < 128 else 0x5F for c in linkname[:100])
    if size > _MAX_OCTAL_11:
        records.append(_pax_record(b"size", b"%d" % size))
    if uid > _MAX_OCTAL_7:
        records.append(_pax_record(b"uid", b"%d" % uid))
        uid = 0
    if gid > _MAX_OCTAL_7:
        records.append(_pax_record(b"gid", b"%d" % gid))
        gid = 0
    if not 0 <= mtime <= _MAX_OCTAL_11:
        records.append(_pax_record(b"mtime", b"%d" % mtime))
        mtime = 0
    for key, value in xattrs:
        records.append(_pax_record(b"SCHILY.xattr." + key, value))
    data = b"".join(records)
    pax = _ustar_header(_PAX_HEADER_NAME, b"", _PAXTYPE, 0o644, 0, 0, len(data), 0, b"", _NO_DEVICE)
    prefix, short = split
    ustar = _ustar_header(
        short,
        prefix,
        typeflag,
        mode,
        uid,
        gid,
        0 if size > _MAX_OCTAL_11 else size,
        mtime,
        linkname,
        devices,
    )
    return pax + data + _ZEROS[: -len(data) % _BLOCK] + ustar


# --------------------------------------------------------------------------- tree walk

_KIND_DIR = 0
_KIND_FILE = 1
_KIND_SYMLINK = 2
_KIND_SPECIAL = 3  # char/block device or FIFO
_KIND_WHITEOUT = 4  # overlay whiteout (0:0 char device), written as .wh.<name>
_KIND_OPAQUE = 5  # synthetic .wh..wh..opq of an opaque overlay directory


def _sort_key(child: tuple) -> bytes:
    return child[0]


class _TreeWriter:
    """Walks the tree in tar-name byte order and writes its entries to a _ChunkSink."""

    def __init__(self, root: bytes, sink: _ChunkSink, source_date_epoch: int | None):
        self._root = root
        self._sink = sink
        self._epoch = source_date_epoch
        self._first_link: dict[tuple[int, int], bytes] = {}

    def _mtime(self, st: os.stat_result) -> int:
        mtime = st.st_mtime_ns // 1_000_000_000
        if self._epoch is not None and mtime > self._epoch:
            return self._epoch
        return mtime

    def _header(self, entry: bytes, typeflag: bytes, st: os.stat_result, **fields) -> None:
        """Write the header of ``entry`` with mode, owner and mtime taken from ``st``."""
        self._sink.write(
            tar_header(
                entry,
                typeflag,
                mode=stat.S_IMODE(st.st_mode),
                uid=st.st_uid,
                gid=st.st_gid,
                mtime=self._mtime(st),
                **{"size": 0, **fields},
            )
        )

    def _whiteout(self, entry: bytes, st: os.stat_result) -> None:
        header = tar_header(
            entry, _REGTYPE, mode=_WHITEOUT_MODE, uid=0, gid=0, size=0, mtime=self._mtime(st)
        )
        self._sink.write(header)

    def write(self, root_fd: int) -> None:
        # Entries are emitted depth-first with each directory's children sorted by their
        # tar name (directories with their trailing "/"): that is exactly the byte order
        # of the full tar names, so the walk streams without sorting the whole tree.
        children = self._list(root_fd, self._root, b"")
        _, opaque = self._xattrs(root_fd, b".")
        if opaque:
            root_st = os.fstat(root_fd)
            children.append((_OPAQUE_WHITEOUT, _KIND_OPAQUE, _OPAQUE_WHITEOUT, root_st))
        children = self._sorted(children, b"")
        stack: list[tuple[int, bytes, bytes, Iterator[tuple]]] = [
            (root_fd, self._root, b"", iter(children))
        ]
        try:
            while stack:
                dir_fd, dir_path, prefix, it = stack[-1]
                child = next(it, None)
                if child is None:
                    stack.pop()
                    if stack:
                        os.close(dir_fd)
                    continue
                key, kind, name, st = child
                entry = prefix + key
                if kind == _KIND_FILE:
                    self._write_file(dir_fd, dir_path, name, entry)
                elif kind == _KIND_DIR:
                    pushed = self._write_dir(dir_fd, dir_path, name, entry)
                    stack.append(pushed)
                elif kind == _KIND_SYMLINK:
                    self._write_symlink(dir_fd, dir_path, name, entry)
                elif kind == _KIND_SPECIAL:
                    self._write_special(dir_path, name, entry, st)
                else:  # whiteouts
                    self._whiteout(entry, st)
        finally:
            for dir_fd, *_ in stack[1:]:
                os.close(dir_fd)
        self._sink.write(_END_OF_ARCHIVE)

    def _list(self, dir_fd: int, dir_path: bytes, prefix: bytes) -> list[tuple]:
        children = []
        try:
            with os.scandir(dir_fd) as it:
                for de in it:
                    name = os.fsencode(de.name)
                    if de.is_dir(follow_symlinks=False):
                        children.append((name + b"/", _KIND_DIR, name, None))
                    elif de.is_file(follow_symlinks=False):
                        children.append((name, _KIND_FILE, name, None))
                    elif de.is_symlink():
                        children.append((name, _KIND_SYMLINK, name, None))
                    else:
                        st = de.stat(follow_symlinks=False)
                        mode = st.st_mode
                        # A 0:0 character device is how overlayfs records a deletion. It
                        # is always converted: a real rootfs has no use for a 0:0 device
                        # (no driver has major 0), so nothing real can be mistaken for one.
                        if stat.S_ISCHR(mode) and st.st_rdev == 0:
                            children.append((_WHITEOUT_PREFIX + name, _KIND_WHITEOUT, name, st))
                        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                            children.append((name, _KIND_SPECIAL, name, st))
                        # sockets (and anything else) have no tar form: skipped
        except OSError as err:
            raise LayerError(
                f"cannot read directory {os.fsdecode(dir_path)!r}: {err.strerror}",
                entry=os.fsdecode(prefix) or ".",
            ) from err
        return children

    @staticmethod
    def _sorted(children: list[tuple], prefix: bytes) -> list[tuple]:
        children.sort(key=_sort_key)
        for before, after in zip(children, children[1:], strict=False):
            if before[0] == after[0]:
                raise LayerError(
                    "two entries map to the same tar name (a whiteout and a real file)",
                    entry=os.fsdecode(prefix + after[0]),
                )
        return children

    def _xattrs(self, target: int | bytes, entry: bytes) -> tuple[list[tuple[bytes, bytes]], bool]:
        """Sorted (name, value) pairs without overlayfs' own, and the opaque flag."""
        try:
            if isinstance(target, int):
                names = os.listxattr(target)
            else:
                names = os.listxattr(target, follow_symlinks=False)
        except OSError as err:
            if err.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return [], False
            raise LayerError(
                f"cannot list xattrs: {err.strerror}", entry=os.fsdecode(entry)
            ) from err
        if not names:
            return [], False
        pairs = []
        opaque = False
        for xname in names:
            try:
                if isinstance(target, int):
                    value = os.getxattr(target, xname)
                else:
                    value = os.getxattr(target, xname, follow_symlinks=False)
            except OSError as err:
                if err.errno == errno.ENODATA:  # removed since listxattr
                    continue
                raise LayerError(
                    f"cannot read xattr {xname}: {err.strerror}", entry=os.fsdecode(entry)
                ) from err
            if is_overlay_xattr(xname):
                if xname.rsplit(".", 1)[1] in _OVERLAY_UNSUPPORTED:
                    raise LayerError(
                        f"overlay upper dir uses {xname} (metacopy/redirect_dir), which "
                        "cannot be turned into a layer: mount without those features",
                        entry=os.fsdecode(entry),
                    )
                if xname == overlay_xattr_prefix() + "opaque" and value == b"y":
                    opaque = True
                continue
            pairs.append((os.fsencode(xname), value))
        pairs.sort()
        return pairs, opaque

    def _write_dir(self, dir_fd: int, dir_path: bytes, name: bytes, entry: bytes) -> tuple:
        path = dir_path + b"/" + name
        try:
            fd = os.open(name, _OPEN_DIR, dir_fd=dir_fd)
        except OSError as err:
            raise LayerError(
                f"cannot open directory {os.fsdecode(path)!r}: {err.strerror}",
                entry=os.fsdecode(entry),
            ) from err
        try:
            st = os.fstat(fd)
            xattrs, opaque = self._xattrs(fd, entry)
            self._header(entry, _DIRTYPE, st, xattrs=xattrs)
            children = self._list(fd, path, entry)
            if opaque:
                children.append((_OPAQUE_WHITEOUT, _KIND_OPAQUE, _OPAQUE_WHITEOUT, st))
            children = self._sorted(children, entry)
        except BaseException:
            os.close(fd)
            raise
        return fd, path, entry, iter(children)

    def _write_file(self, dir_fd: int, dir_path: bytes, name: bytes, entry: bytes) -> None:
        try:
            fd = os.open(name, _OPEN_FILE, dir_fd=dir_fd)
        except OSError as err:
            raise LayerError(
                f"cannot open {os.fsdecode(dir_path + b'/' + name)!r}: {err.strerror}",
                entry=os.fsdecode(entry),
            ) from err
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise LayerError(
                    "file changed type while the layer was written", entry=os.fsdecode(entry)
                )
            if st.st_nlink > 1:
                inode = (st.st_dev, st.st_ino)
                target = self._first_link.get(inode)
                if target is not None:
                    self._header(entry, _LNKTYPE, st, linkname=target)
                    return
                self._first_link[inode] = entry
            xattrs, _ = self._xattrs(fd, entry)
            size = st.st_size
            self._header(entry, _REGTYPE, st, size=size, xattrs=xattrs)
            try:
                self._sink.copy_fd(fd, size)
            except OSError as err:
                raise LayerError(
                    f"cannot read file: {err.strerror}", entry=os.fsdecode(entry)
                ) from err
        finally:
            os.close(fd)

    def _write_symlink(self, dir_fd: int, dir_path: bytes, name: bytes, entry: bytes) -> None:
        path = dir_path + b"/" + name
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            target = os.readlink(name, dir_fd=dir_fd)
        except OSError as err:
            raise LayerError(
                f"cannot read symlink: {err.strerror}", entry=os.fsdecode(entry)
            ) from err
        xattrs, _ = self._xattrs(path, entry)
        self._header(entry, _SYMTYPE, st, linkname=target, xattrs=xattrs)

    def _write_special(self, dir_path: bytes, name: bytes, entry: bytes, st) -> None:
        mode = st.st_mode
        if stat.S_ISFIFO(mode):
            typeflag, major, minor = _FIFOTYPE, 0, 0
        else:
            typeflag = _CHRTYPE if stat.S_ISCHR(mode) else _BLKTYPE
            major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        xattrs, _ = self._xattrs(dir_path + b"/" + name, entry)
        self._header(entry, typeflag, st, devmajor=major, devminor=minor, xattrs=xattrs)


# --------------------------------------------------------------------------- chunking


class _Aborted(Exception):
    """Raised in the walking thread when a later stage has already failed."""


class _ChunkSink:
    """Cuts the tar stream into CHUNK_SIZE buffers from the pipeline's pool.

    Every buffer but the last is full, so the chunk boundaries depend only on the stream.
    """

    def __init__(self, pipeline: _Pipeline):
        self._pipeline = pipeline
        self._buf, self._view = pipeline.take_buffer()
        self._pos = 0

    def _ship(self) -> None:
        self._pipeline.submit(self._buf, self._pos)
        self._buf, self._view = self._pipeline.take_buffer()
        self._pos = 0

    def write(self, data: bytes | memoryview) -> None:
        pos = self._pos
        end = pos + len(data)
        if end < CHUNK_SIZE:
            self._view[pos:end] = data
            self._pos = end
            return
        data = memoryview(data)
        while data:
            take = min(len(data), CHUNK_SIZE - self._pos)
            self._view[self._pos : self._pos + take] = data[:take]
            self._pos += take
            data = data[take:]
            if self._pos == CHUNK_SIZE:
                self._ship()

    def copy_fd(self, fd: int, size: int) -> None:
        """Exactly ``size`` bytes of ``fd`` plus the block padding; a file that shrank
        while being read is zero-filled, one that grew is cut, so the tar stays valid."""
        remaining = size
        while remaining:
            take = min(remaining, CHUNK_SIZE - self._pos)
            got = os.readv(fd, [self._view[self._pos : self._pos + take]])
            if got == 0:
                self._write_zeros(remaining)
                remaining = 0
                break
            self._pos += got
            remaining -= got
            if self._pos == CHUNK_SIZE:
                self._ship()
        self._write_zeros(-size % _BLOCK)

    def _write_zeros(self, count: int) -> None:
        while count:
            take = min(count, CHUNK_SIZE)
            self.write(_ZERO_VIEW[:take])
            count -= take

    def copy_stream(self, src: BinaryIO) -> None:
        readinto = getattr(src, "readinto", None)
        while True:
            space = self._view[self._pos :]
            if readinto is not None:
                got = readinto(space)
            else:
                data = src.read(len(space))
                got = len(data)
                space[:got] = data
            if not got:
                break
            self._pos += got
            if self._pos == CHUNK_SIZE:
                self._ship()

    def close(self) -> None:
        self._pipeline.submit_last(self._buf, self._pos)
        self._buf = self._view = None


# --------------------------------------------------------------------------- codecs

_Emit = Callable[[object, bytearray | None], None]


class _ZstdCodec:
    def __init__(self, level: int, threads: int):
        self._level = level
        self._threads = threads
        self._emit: _Emit | None = None
        self._writer = None

    def whole(self, view: memoryview) -> bytes:
        return zstandard.ZstdCompressor(level=self._level).compress(view)

    def _start(self) -> None:
        # Worker threads always (never zstd's single-threaded mode) for a stream of more
        # than one chunk: the frame is then the same for any worker count.
        params = zstandard.ZstdCompressionParameters.from_level(
            self._level, threads=self._threads, job_size=ZSTD_JOB_SIZE
        )
        # stream_writer rather than compressobj: it reuses one output buffer, where
        # compressobj builds a fresh multi-MiB bytes per call (page faults cost ~40% more
        # CPU here).
        self._writer = zstandard.ZstdCompressor(compression_params=params).stream_writer(
            self, write_size=_ZSTD_WRITE_SIZE, closefd=False
        )

    def write(self, data: bytes) -> int:  # called by the zstd writer with compressed bytes
        self._emit(data, None)
        return len(data)

    def feed(self, view: memoryview, buf: bytearray, emit: _Emit) -> bool:
        self._emit = emit
        if self._writer is None:
            self._start()
        self._writer.write(view)
        return True  # the compressor copied the input: the buffer is free again

    def finish(self, emit: _Emit) -> None:
        # With worker threads, zstd decides whether the last full job ends the frame or an
        # empty last block follows by a race between its workers and the caller: the same
        # input can give two different frames. A block flush first always cuts the pending
        # input into a non-final job, so the frame always ends with the same empty block.
        self._emit = emit
        self._writer.flush(zstandard.FLUSH_BLOCK)
        self._writer.flush(zstandard.FLUSH_FRAME)

    def close(self) -> None:
        pass


_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"  # no name, mtime 0, OS unix
_DEFLATE_DICT = 32 << 10


def _final_deflate_block() -> bytes:
    return zlib.compressobj(6, zlib.DEFLATED, -15).flush()


_DEFLATE_END = _final_deflate_block()
_STORED_MAX = 0xFFFF
_INCOMPRESSIBLE = 0.98
_probes = threading.local()


def _deflate_chunk(view: memoryview, zdict: bytes | None, level: int) -> bytes:
    """One chunk as a run of deflate blocks ending byte-aligned (not final).

    Chunks are independent apart from the 32 KiB dictionary (the end of the previous
    chunk), so they can be deflated in parallel and the result does not depend on the
    number of threads.  A chunk a fast zstd pass cannot shrink is written as stored
    blocks: deflate would reach the same size, ~20x slower.
    """
    if level > 0:
        probe = getattr(_probes, "compressor", None)
        if probe is None:
            probe = _probes.compressor = zstandard.ZstdCompressor(level=-3)
        if len(probe.compress(view)) >= _INCOMPRESSIBLE * len(view):
            level = 0
    if level == 0:
        parts = []
        for start in range(0, len(view), _STORED_MAX):
            piece = view[start : start + _STORED_MAX]
            parts.append(b"\x00" + struct.pack("<HH", len(piece), len(piece) ^ 0xFFFF))
            parts.append(piece)
        return b"".join(parts)
    if zdict:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, zdict)
    else:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15, 8)
    return compressor.compress(view) + compressor.flush(zlib.Z_SYNC_FLUSH)


class _GzipCodec:
    def __init__(self, level: int, threads: int):
        self._level = level
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._crc = 0
        self._size = 0
        self._zdict: bytes | None = None
        self._started = False

    def feed(self, view: memoryview, buf: bytearray, emit: _Emit) -> bool:
        if not self._started:
            emit(_GZIP_HEADER, None)
            self._started = True
        self._crc = zlib.crc32(view, self._crc)
        self._size += len(view)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="kiln-deflate")
        job = self._pool.submit(_deflate_chunk, view, self._zdict, self._level)
        self._zdict = bytes(view[-_DEFLATE_DICT:])
        emit(job, buf)  # the buffer is freed once the job's output is written
        return False

    def finish(self, emit: _Emit) -> None:
        if not self._started:
            emit(_GZIP_HEADER, None)
        emit(_DEFLATE_END + struct.pack("<II", self._crc, self._size & 0xFFFFFFFF), None)

    def whole(self, view: memoryview) -> bytes:
        trailer = struct.pack("<II", zlib.crc32(view), len(view) & 0xFFFFFFFF)
        body = _deflate_chunk(view, None, self._level) if view else b""
        return _GZIP_HEADER + body + _DEFLATE_END + trailer

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class _TarCodec:
    def feed(self, view: memoryview, buf: bytearray, emit: _Emit) -> bool:
        emit(view, buf)
        return False

    def whole(self, view: memoryview) -> memoryview:
        return view

    def finish(self, emit: _Emit) -> None:
        pass

    def close(self) -> None:
        pass


def _make_codec(compression: str, level: int | None, threads: int | None):
    if compression not in _MEDIA_TYPES:
        raise LayerError(f"unsupported layer compression {compression!r}: use zstd, gzip or none")
    if threads is None:
        threads = os.cpu_count() or 1
    if threads < 1:
        raise LayerError(f"compression threads must be >= 1, got {threads}")
    if compression == "zstd":
        level = ZSTD_DEFAULT_LEVEL if level is None else level
        if not -(1 << 17) <= level <= zstandard.MAX_COMPRESSION_LEVEL or level == 0:
            raise LayerError(
                f"zstd level must be 1..{zstandard.MAX_COMPRESSION_LEVEL} "
                f"(or negative for the fast levels), got {level}"
            )
        return _ZstdCodec(level, threads)
    if compression == "gzip":
        level = GZIP_DEFAULT_LEVEL if level is None else level
        if not 0 <= level <= 9:
            raise LayerError(f"gzip level must be 0..9, got {level}")
        return _GzipCodec(level, threads)
    if level is not None:
        raise LayerError("an uncompressed layer takes no compression level")
    return _TarCodec()


# --------------------------------------------------------------------------- pipeline


class _BufferPool:
    """Chunk buffers kept from one layer to the next.

    A fresh buffer costs a page fault per 4 KiB when first filled (~10 ms for a full set
    here), which would dominate the many small layers a build writes.
    """

    def __init__(self, keep: int):
        self._keep = keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self) -> bytearray:
        with self._lock:
            if self._free:
                return self._free.pop()
        return bytearray(CHUNK_SIZE)

    def give(self, buffers: list[bytearray]) -> None:
        with self._lock:
            room = self._keep - len(self._free)
            self._free.extend(buffers[:room])


_BUFFERS = _BufferPool(_BUFFER_COUNT)


class _Pipeline:
    """The walker (caller's thread) -> hash+compress thread -> hash+write thread."""

    def __init__(self, out: BinaryIO, codec):
        self._out = out
        self._codec = codec
        self._hash_tar = hashlib.sha256()
        self._hash_out = None if isinstance(codec, _TarCodec) else hashlib.sha256()
        self.tar_size = 0
        self.out_size = 0
        # Buffers in flight for this layer: taken from _BUFFERS as needed, up to
        # _BUFFER_COUNT, then recycled through _free (which bounds memory use).
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._taken = 0
        self._chunks: queue.Queue = queue.Queue(maxsize=_QUEUE_DEPTH)
        self._outputs: queue.Queue = queue.Queue(maxsize=_OUT_QUEUE_DEPTH)
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # walker side
    def take_buffer(self) -> tuple[bytearray, memoryview]:
        if self._error is not None:
            raise _Aborted
        try:
            buf = self._free.get_nowait()
        except queue.Empty:
            if self._taken < _BUFFER_COUNT:
                self._taken += 1
                buf = _BUFFERS.take()
            else:
                buf = self._free.get()
        return buf, memoryview(buf)

    def submit(self, buf: bytearray, length: int) -> None:
        """A full chunk; more follow."""
        # Hashing here rather than in the compress thread balances the stages: the walk
        # itself is cheap next to sha256 and zstd.
        self._hash_tar.update(memoryview(buf)[:length])
        self.tar_size += length
        if not self._threads:
            self._start_threads()
        self._chunks.put((buf, length))

    def submit_last(self, buf: bytearray, length: int) -> None:
        """The end of the stream (``length`` may be 0)."""
        if self._threads:
            if length:
                self.submit(buf, length)
            else:
                self._free.put(buf)
            return
        # The whole stream fits in one chunk (most build steps' layers): done here, as
        # handing it to threads would cost more than the work (and a scheduling delay
        # per hand-off on a busy machine). zstd then runs single-threaded: the choice
        # depends only on the stream's length, so the output stays deterministic.
        view = memoryview(buf)[:length]
        self._hash_tar.update(view)
        self.tar_size += length
        self._write_out(self._codec.whole(view))
        self._free.put(buf)

    def _start_threads(self) -> None:
        self._threads = [
            threading.Thread(target=self._compress_loop, name="kiln-layer-compress"),
            threading.Thread(target=self._write_loop, name="kiln-layer-write"),
        ]
        for thread in self._threads:
            thread.start()

    def _fail(self, err: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = err

    def run(self, produce: Callable[[_ChunkSink], None]) -> None:
        try:
            sink = _ChunkSink(self)
            produce(sink)
            sink.close()
        except _Aborted:
            pass
        except BaseException as err:
            self._fail(err)
        finally:
            if self._threads:
                self._chunks.put(None)
                for thread in self._threads:
                    thread.join()
            self._codec.close()
            returned = []
            while not self._free.empty():
                returned.append(self._free.get_nowait())
            _BUFFERS.give(returned)
        if self._error is not None:
            err = self._error
            if isinstance(err, KilnError):
                raise err
            if isinstance(err, OSError):
                raise LayerError(f"layer stream failed: {err}") from err
            raise err

    # compress thread
    def _emit(self, item: object, buf: bytearray | None) -> None:
        self._outputs.put((item, buf))

    def _compress_loop(self) -> None:
        try:
            while True:
                item = self._chunks.get()
                if item is None:
                    break
                buf, length = item
                if self._error is not None:
                    self._free.put(buf)
                    continue
                try:
                    view = memoryview(buf)[:length]
                    if self._codec.feed(view, buf, self._emit):
                        self._free.put(buf)
                except BaseException as err:
                    self._fail(err)
                    self._free.put(buf)
            if self._error is None:
                try:
                    self._codec.finish(self._emit)
                except BaseException as err:
                    self._fail(err)
        finally:
            self._outputs.put(None)

    # write thread
    def _write_loop(self) -> None:
        while True:
            item = self._outputs.get()
            if item is None:
                break
            data, buf = item
            if self._error is None:
                try:
                    if isinstance(data, Future):
                        data = data.result()
                    self._write_out(data)
                except BaseException as err:
                    self._fail(err)
            if buf is not None:
                self._free.put(buf)

    def _write_out(self, data: bytes | memoryview) -> None:
        if not data:
            return
        if self._hash_out is not None:
            self._hash_out.update(data)
        written = self._out.write(data)
        if written is not None and written < len(data):
            # raw files and pipes may take less than asked
            rest = memoryview(data)[written:]
            while rest:
                written = self._out.write(rest)
                if not written:
                    raise LayerError("layer output accepts no more bytes")
                rest = rest[written:]
        self.out_size += len(data)

    def result(self, compression: str) -> LayerBlob:
        diff_id = "sha256:" + self._hash_tar.hexdigest()
        digest = diff_id if self._hash_out is None else "sha256:" + self._hash_out.hexdigest()
        return LayerBlob(
            media_type=_MEDIA_TYPES[compression],
            digest=digest,
            size=self.out_size,
            diff_id=diff_id,
            uncompressed_size=self.tar_size,
        )
