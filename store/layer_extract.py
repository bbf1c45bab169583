"""Safe extraction of one OCI/Docker layer tarball into an overlay-format directory.

Nothing outside ``dest`` is ever created, changed or deleted, whatever the tar
says. Every path is walked component by component from an O_DIRECTORY fd of
``dest`` with O_NOFOLLOW, so a symlink (from this layer) is never written
through; names with ``..`` or a leading ``/`` are refused; hardlinks may only
point at entries already extracted in this layer.

Two background threads decompress and hash the stream (the diff_id covers
everything to EOF, trailing blocks included) while the calling thread parses
tar headers and writes files with fd-relative syscalls; on any failure
``dest`` is removed and a LayerError names the layer and the entry.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import shutil
import stat
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import BinaryIO

from store.compression import (
    IN_CHUNK,
    CountingReader,
    ExpansionBudget,
    StreamError,
    compression_for,
    decompressed_chunks,
    is_layer_media_type,
    read_some,
    within_budget,
)
from store.digest import validate_digest
from store.errors import DigestError, KilnError, LayerError
from store.fsutil import current_umask, overlay_xattr_prefix

# --------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class ExtractLimits:
    max_entries: int
    max_header_bytes: int
    max_path_bytes: int
    max_total_bytes: int
    max_zstd_window_log: int
    max_ratio: int = 100  # uncompressed:compressed, checked past ratio_from (0: never)
    ratio_from: int = 1 << 30

    def budget(self) -> ExpansionBudget:
        return ExpansionBudget(self.max_total_bytes, self.max_ratio, self.ratio_from)


# 500,000 entries: the biggest real layers we know of (CUDA/PyTorch site-packages,
# node_modules monorepos, texlive) hold 100k-250k files, so twice that is never
# reached by an honest layer, while a hostile 10^6-entry tar is stopped early.
# 64 GiB uncompressed: CUDA toolkits and baked-in model weights make layers of 10-30 GiB.
# 100:1 past 1 GiB: real layers are 2-10:1 (busybox 2:1, text-heavy ones up to ~20:1) and a
# big layer is never almost all zeros, while a gzip bomb is ~1000:1 (deflate's ceiling, so
# 1000:1 would let it run to 64 GiB) and a zstd one ~30000:1: at most ~1 GiB is written.
DEFAULT_LIMITS = ExtractLimits(
    max_entries=500_000,
    max_header_bytes=1 << 20,
    max_path_bytes=4096,
    max_total_bytes=64 << 30,
    max_zstd_window_log=27,
    max_ratio=100,
    ratio_from=1 << 30,
)

LIMIT_VARIABLES = {  # environment variable -> ExtractLimits field; read at each extraction
    "KILN_MAX_LAYER_SIZE": "max_total_bytes",
    "KILN_MAX_LAYER_RATIO": "max_ratio",
    "KILN_LAYER_RATIO_FROM": "ratio_from",
}


def limits_from_env(environ: Mapping[str, str] | None = None,
                    base: ExtractLimits = DEFAULT_LIMITS) -> ExtractLimits:
    """``base`` with the KILN_MAX_LAYER_SIZE / KILN_MAX_LAYER_RATIO / KILN_LAYER_RATIO_FROM
    settings applied (sizes as bytes or with a K/M/G/T suffix, powers of 1024)."""
    environ = os.environ if environ is None else environ
    changes = {}
    for name, fld in LIMIT_VARIABLES.items():
        text = environ.get(name, "").strip()
        if text:
            changes[fld] = _parse_size(name, text, ratio=fld == "max_ratio")
    return replace(base, **changes) if changes else base


def _parse_size(name: str, text: str, *, ratio: bool) -> int:
    value = text.lower().removesuffix("ib").removesuffix("b") if not ratio else text
    scale = 1
    if not ratio and value[-1:] in _SIZE_UNITS:
        scale = _SIZE_UNITS[value[-1]]
        value = value[:-1]
    if not value.isdigit():
        want = "a whole number (0: no ratio check)" if ratio else "a size like 64G or 512M"
        raise KilnError(f"{name}={text!r}: expected {want}")
    return int(value) * scale


_SIZE_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

NAME_MAX = 255  # Linux's limit for one path component


@dataclass(frozen=True)
class ExtractResult:
    diff_id: str  # sha256 of the whole uncompressed stream, verified when expected
    uncompressed_size: int
    entries: int
    notes: tuple[str, ...] = ()  # things skipped on purpose (devices when unprivileged, ...)


_QUEUE_DEPTH = 8  # per queue; two queues, so at most ~16 MiB is in flight


# --------------------------------------------------------------------------- reader thread

_EOF = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Blocking put that gives up once ``stop`` is set (the consumer went away)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


class _Pump:
    """Background pipeline: one thread decompresses and counts, a second one hashes.

    Chunks flow reader -> hasher -> parser through bounded queues, so memory
    stays at a few dozen MiB whatever the layer expands to, and on two cores
    decompressing, hashing and writing files overlap.
    """

    def __init__(self, blob: BinaryIO, media_type: str, limits: ExtractLimits):
        self._blob = blob
        self._media_type = media_type
        self._limits = limits
        self._raw: queue.Queue = queue.Queue(maxsize=_QUEUE_DEPTH)
        self.queue: queue.Queue = queue.Queue(maxsize=_QUEUE_DEPTH)  # what the parser reads
        self.stop = threading.Event()
        self.hash = hashlib.sha256()
        self.total = 0
        self._threads = [
            threading.Thread(target=self._read, name="kiln-layer-reader", daemon=True),
            threading.Thread(target=self._hash, name="kiln-layer-hasher", daemon=True),
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self) -> None:
        for t in self._threads:
            t.join()

    def _read(self) -> None:
        stop = self.stop
        try:
            # compressed bytes in, counted for the ratio check; stops at the next chunk
            # once the pump is shut down (its parser failed, or was interrupted)
            blob = CountingReader(self._blob, stop)
            head = read_some(blob, IN_CHUNK)
            if not head:
                raise StreamError("layer blob is empty")
            chunks = decompressed_chunks(
                blob, compression_for(self._media_type, head), head,
                max_window_log=self._limits.max_zstd_window_log)
            for chunk in within_budget(chunks, blob, self._limits.budget()):
                self.total += len(chunk)
                if not _put(self._raw, chunk, stop):
                    return
            _put(self._raw, _EOF, stop)
        except BaseException as e:  # handed down the pipeline to the parser, which raises it
            _put(self._raw, _Failure(e), stop)

    def _hash(self) -> None:
        get, update, stop = self._raw.get, self.hash.update, self.stop
        while True:
            try:
                item = get(timeout=0.05)
            except queue.Empty:
                if stop.is_set():
                    return
                continue
            if item is not _EOF and not isinstance(item, _Failure):
                update(item)
            if not _put(self.queue, item, stop) or item is _EOF or isinstance(item, _Failure):
                return

    def shutdown(self) -> None:
        self.stop.set()
        while any(t.is_alive() for t in self._threads):
            for q in (self._raw, self.queue):
                try:
                    while True:
                        q.get_nowait()
                except queue.Empty:
                    pass
            for t in self._threads:
                t.join(timeout=0.05)


# --------------------------------------------------------------------------- tar stream


class _Refused(Exception):
    """This entry cannot be extracted safely or is malformed."""


class _Truncated(_Refused):
    pass


class _ChunkStream:
    """The uncompressed tar as a sequence of queued chunks, read in place."""

    __slots__ = ("_q", "_buf", "_mv", "_pos", "_len", "eof")

    def __init__(self, q: queue.Queue):
        self._q = q
        self._buf = b""
        self._mv = memoryview(b"")
        self._pos = 0
        self._len = 0
        self.eof = False

    def _next(self) -> bool:
        if self.eof:
            return False
        item = self._q.get()
        if item is _EOF:
            self.eof = True
            return False
        if isinstance(item, _Failure):
            raise item.exc
        self._buf = item
        self._mv = memoryview(item)
        self._pos = 0
        self._len = len(item)
        return True

    def header(self) -> bytes | None:
        """The next 512-byte block, or None at a clean end of stream."""
        pos = self._pos
        if pos + 512 <= self._len:
            self._pos = pos + 512
            return self._buf[pos : pos + 512]
        if pos == self._len and not self._next():
            return None
        return self.read(512)

    def read(self, n: int) -> bytes:
        pos = self._pos
        end = pos + n
        if end <= self._len:
            self._pos = end
            return self._buf[pos:end]
        parts = [self._buf[pos:]]
        need = n - (self._len - pos)
        self._pos = self._len
        while need:
            if not self._next():
                raise _Truncated("the tar stream ends inside this entry (truncated?)")
            take = min(need, self._len)
            parts.append(self._buf[:take])
            self._pos = take
            need -= take
        return b"".join(parts)

    def skip(self, n: int) -> None:
        while n:
            avail = self._len - self._pos
            if avail >= n:
                self._pos += n
                return
            n -= avail
            self._pos = self._len
            if not self._next():
                raise _Truncated("the tar stream ends inside this entry (truncated?)")

    def copy_to(self, fd: int, n: int, offset: int | None = None) -> None:
        write = os.write
        while n:
            avail = self._len - self._pos
            if not avail:
                if not self._next():
                    raise _Truncated("the tar stream ends inside this entry's data (truncated?)")
                continue
            take = n if n < avail else avail
            pos = self._pos
            view = self._mv[pos : pos + take]
            if offset is None:
                done = write(fd, view)
                while done < take:
                    done += write(fd, view[done:])
            else:
                done = 0
                while done < take:
                    done += os.pwrite(fd, view[done:], offset + done)
                offset += take
            self._pos = pos + take
            n -= take

    def drain(self) -> None:
        self._pos = self._len
        while self._next():
            self._pos = self._len


# --------------------------------------------------------------------------- tar headers

_HDR = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
_ZERO_BLOCK = bytes(512)
_POSIX_MAGIC = b"ustar\x00"

_REG_TYPES = (b"0", b"\x00", b"7")
_HEADER_ONLY_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")
_META_TYPES = (b"L", b"K", b"x", b"X", b"g", b"V")


def _num(field: bytes, what: str) -> int:
    if field[0] < 0x80:
        s = field.rstrip(b"\0")
        if not s.isdigit():  # the common case is zero-padded digits and a NUL
            s = field.split(b"\0", 1)[0].strip(b" ")
        if not s:
            return 0
        if not s.isdigit():
            raise _Refused(f"invalid octal {what} field {s!r}")
        try:
            return int(s, 8)
        except ValueError:
            raise _Refused(f"invalid octal {what} field {s!r}") from None
    # base-256 (GNU/star): 0x80 = positive, 0xff = negative two's complement
    value = int.from_bytes(field[1:], "big")
    if field[0] == 0xFF:
        value -= 1 << (8 * (len(field) - 1))
    elif field[0] != 0x80:
        raise _Refused(f"invalid base-256 {what} field")
    return value


def _check_checksum(block: bytes, field: bytes) -> None:
    unsigned = sum(block) - sum(field) + 256  # the field counts as 8 spaces
    if field == b"%06o\0 " % unsigned:  # how GNU tar, Go and Python write it
        return
    want = _num(field, "checksum")
    if want == unsigned:
        return
    high = sum(1 for b in block if b & 0x80) - sum(1 for b in field if b & 0x80)
    if want == unsigned - 256 * high:  # historic tars summed signed chars
        return
    raise _Refused(f"tar header checksum mismatch (header says {want}, block sums to {unsigned})")


def _parse_pax(data: bytes, pax: dict[bytes, bytes]) -> None:
    sparse_00: list[bytes] = []  # GNU sparse 0.0 repeats offset/numbytes records
    pos, n = 0, len(data)
    while pos < n:
        if data[pos] == 0 and data.count(0, pos) == n - pos:
            break  # some writers pad the record block with NULs
        sp = data.find(b" ", pos, pos + 21)
        if sp < 0 or not data[pos:sp].isdigit():
            raise _Refused("malformed PAX extended header record")
        length = int(data[pos:sp])
        end = pos + length
        if length <= sp - pos + 1 or end > n or data[end - 1] != 0x0A:
            raise _Refused("malformed PAX extended header record length")
        key, eq, value = data[sp + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise _Refused("malformed PAX extended header record (no key=value)")
        if key == b"GNU.sparse.offset" or key == b"GNU.sparse.numbytes":
            sparse_00.append(value)
        else:
            pax[key] = value  # an empty value unsets the key (the header field applies)
        pos = end
    if sparse_00:
        pax[b"GNU.sparse.map"] = b",".join(sparse_00)


def _pax_int(value: bytes, what: str) -> int:
    if not value.isdigit():
        raise _Refused(f"invalid PAX {what} value {value[:40]!r}")
    return int(value)


def _pax_time_ns(value: bytes) -> int:
    neg = value.startswith(b"-")
    whole, _, frac = (value[1:] if neg else value).partition(b".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise _Refused(f"invalid PAX mtime value {value[:40]!r}")
    ns = int(whole) * 1_000_000_000 + int((frac + b"000000000")[:9])
    return -ns if neg else ns


# --------------------------------------------------------------------------- the layer tree

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_CACHE_MAX = 256
_DROPPED_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.")
_XATTR_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.E2BIG, errno.ERANGE)


class _LayerTree:
    """fd-relative operations inside the layer dir; never follows a symlink."""

    def __init__(self, root_fd: int):
        self.root_fd = root_fd
        self._dirs: dict[bytes, int] = {b"": root_fd}
        self.privileged = os.geteuid() == 0
        self.can_mknod = self.privileged
        self.uid = os.geteuid()
        self.gid = os.getegid()
        # mode bits that open()/mkdir() may not apply by themselves
        self.chmod_mask = 0o7000 | current_umask()
        self.deferred_dirs: dict[bytes, tuple[int, int]] = {}
        self.notes: list[str] = []
        self.opaque_xattr = os.fsencode(overlay_xattr_prefix() + "opaque")

    def close(self) -> None:
        for key, fd in self._dirs.items():
            if key:
                os.close(fd)
        self._dirs = {b"": self.root_fd}

    def trim_cache(self) -> None:
        """Bound the open directory fds; only called between entries, when none is in use."""
        if len(self._dirs) > _DIR_CACHE_MAX:
            self.close()

    # ---- directory walk

    def dir_fd(self, key: bytes, create: bool) -> int:
        fd = self._dirs.get(key)
        if fd is not None:
            return fd
        parts = key.split(b"/")
        i = len(parts) - 1
        while i > 0 and b"/".join(parts[:i]) not in self._dirs:
            i -= 1
        fd = self._dirs[b"/".join(parts[:i])]
        for j in range(i, len(parts)):
            fd = self._open_child_dir(fd, parts[j], create, b"/".join(parts[: j + 1]))
            self._dirs[b"/".join(parts[: j + 1])] = fd
        return fd

    def _open_child_dir(self, parent: int, name: bytes, create: bool, shown: bytes) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise _Refused(f"{_show(shown)!r} does not exist in this layer") from None
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                what = "a symlink" if _is_symlink(parent, name) else "not a directory"
                raise _Refused(
                    f"path component {_show(shown)!r} is {what}; refusing to go through it"
                ) from None
            raise
        os.mkdir(name, 0o755, dir_fd=parent)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        os.fchmod(fd, 0o755)
        return fd

    def forget_dirs(self, key: bytes) -> None:
        """A directory at key was removed: drop cached fds and pending metadata under it.

        Only fds at or under key are closed, so a caller's parent fd stays valid.
        """
        prefix = key + b"/"
        for k in [k for k in self._dirs if k == key or k.startswith(prefix)]:
            os.close(self._dirs.pop(k))
        for k in [k for k in self.deferred_dirs if k == key or k.startswith(prefix)]:
            del self.deferred_dirs[k]

    def remove(self, parent: int, name: bytes, key: bytes) -> None:
        """Remove whatever is at name (never following it); directories recursively."""
        try:
            os.unlink(name, dir_fd=parent)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            shutil.rmtree(name, dir_fd=parent)
            self.forget_dirs(key)

    # ---- metadata

    def chown_needed(self, uid: int, gid: int) -> bool:
        return self.privileged and (uid != self.uid or gid != self.gid)


    def set_xattrs(self, target: int | bytes, xattrs: list[tuple[bytes, bytes]]) -> None:
        follow = isinstance(target, int)
        for name, value in xattrs:
            if name.startswith(_DROPPED_XATTR_PREFIXES):
                continue  # overlay's own metadata is never taken from a tar
            try:
                os.setxattr(target, name, value, follow_symlinks=follow)
            except OSError as e:
                if name == b"security.capability" or e.errno not in _XATTR_UNSUPPORTED:
                    raise _Refused(f"cannot set xattr {_show(name)}: {e.strerror}") from None
                self.notes.append(f"xattr {_show(name)} not set: {e.strerror}")

    def node_path(self, parent: int, name: bytes) -> bytes:
        return b"/proc/self/fd/%d/%s" % (parent, name)


def _is_symlink(parent: int, name: bytes) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=parent).st_mode)
    except OSError:
        return False


def _show(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


# --------------------------------------------------------------------------- extraction


@dataclass(slots=True)
class _Entry:
    name: bytes  # raw name, for messages
    parts: list[bytes]
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: list[tuple[bytes, bytes]]


class _Extractor:
    def __init__(self, stream: _ChunkStream, tree: _LayerTree, limits: ExtractLimits):
        self.s = stream
        self.tree = tree
        self.limits = limits
        self.entries = 0
        self.content_bytes = 0
        self.current: bytes | None = None

    # ---- names

    def clean(self, raw: bytes, what: str) -> list[bytes]:
        if not raw:
            raise _Refused(f"empty {what}")
        if b"\0" in raw:
            raise _Refused(f"{what} contains a NUL byte")
        if raw[0] == 0x2F:
            raise _Refused(f"absolute {what} refused")
        if len(raw) > self.limits.max_path_bytes:
            raise _Refused(f"{what} is longer than {self.limits.max_path_bytes} bytes")
        parts = raw.split(b"/")
        if b"" in parts or b"." in parts:  # "./x", "a//b", "dir/": drop the empty and "." parts
            parts = [p for p in parts if p and p != b"."]
        if b".." in parts:
            raise _Refused(f"'..' in {what} refused")
        if len(raw) > NAME_MAX and max(map(len, parts)) > NAME_MAX:
            raise _Refused(f"a component of the {what} is longer than {NAME_MAX} bytes")
        return parts

    # ---- main loop

    def run(self) -> None:
        s = self.s
        limits = self.limits
        long_name: bytes | None = None
        long_link: bytes | None = None
        pax: dict[bytes, bytes] = {}
        meta_bytes = 0
        unpack = _HDR.unpack
        trim = self.tree.trim_cache
        # mode/uid/gid/mtime fields repeat a lot across entries: parse each spelling once
        cache: dict[bytes, int] = {}

        def num(field: bytes, what: str) -> int:
            value = cache.get(field)
            if value is None:
                value = _num(field, what)
                if len(cache) < 4096:
                    cache[field] = value
            return value

        while True:
            self.current = None
            trim()
            block = s.header()
            if block is None:
                raise _Truncated("the tar stream ends without an end-of-archive block (truncated?)")
            if block == _ZERO_BLOCK:
                break
            (name, mode, uid, gid, size, mtime, chksum, typ, linkname, magic, _version,
             _uname, _gname, devmajor, devminor, prefix) = unpack(block)
            name = name.split(b"\0", 1)[0]
            self.current = long_name or pax.get(b"path") or name
            _check_checksum(block, chksum)
            size = _num(size, "size")
            if size < 0:
                raise _Refused("negative size")

            if typ in _META_TYPES:
                if typ == b"V":
                    s.skip(size + (-size % 512))
                    continue
                meta_bytes += size
                if size > limits.max_header_bytes or meta_bytes > limits.max_header_bytes:
                    raise _Refused(
                        f"extended header of {size} bytes is over the limit of "
                        f"{limits.max_header_bytes} bytes"
                    )
                if typ == b"g":
                    s.skip(size + (-size % 512))  # global headers are ignored
                    meta_bytes -= size
                    continue
                data = s.read(size)
                s.skip(-size % 512)
                if typ == b"L":
                    long_name = data.rstrip(b"\0")
                elif typ == b"K":
                    long_link = data.rstrip(b"\0")
                else:
                    _parse_pax(data, pax)
                continue

            # a real member
            self.entries += 1
            if self.entries > limits.max_entries:
                raise _Refused(f"layer has more than max_entries ({limits.max_entries}) entries")
            if magic == _POSIX_MAGIC and prefix[0]:
                name = prefix.split(b"\0", 1)[0] + b"/" + name
            if long_name is not None:
                name = long_name
            link = linkname.split(b"\0", 1)[0]
            if long_link is not None:
                link = long_link
            mtime_ns = num(mtime, "mtime") * 1_000_000_000
            uid = num(uid, "uid")
            gid = num(gid, "gid")
            xattrs: list[tuple[bytes, bytes]] = []
            if pax:
                name, link, size, uid, gid, mtime_ns = self._apply_pax(
                    pax, xattrs, name, link, size, uid, gid, mtime_ns
                )
            self.current = name
            if uid < 0 or gid < 0:
                raise _Refused("negative uid or gid")
            if typ == b"\0" and name.endswith(b"/"):
                typ = b"5"  # old V7 tars mark directories by a trailing slash
            entry = _Entry(
                name, self.clean(name, "name"), typ, num(mode, "mode") & 0o7777, uid, gid,
                size, mtime_ns, link, 0, 0, xattrs,
            )
            if typ in (b"3", b"4"):
                entry.devmajor = _num(devmajor, "devmajor")
                entry.devminor = _num(devminor, "devminor")
            sparse_pax = pax if pax and (b"GNU.sparse.major" in pax or b"GNU.sparse.map" in pax
                                         or b"GNU.sparse.numblocks" in pax) else None
            self._dispatch(entry, block, sparse_pax)
            long_name = long_link = None
            if pax:
                pax = {}
            meta_bytes = 0
        self.current = None
        s.drain()

    def _apply_pax(self, pax, xattrs, name, link, size, uid, gid, mtime_ns):
        for key, value in pax.items():
            if not value:
                continue
            if key == b"path":
                name = value
            elif key == b"linkpath":
                link = value
            elif key == b"size":
                size = _pax_int(value, "size")
            elif key == b"uid":
                uid = _pax_int(value, "uid")
            elif key == b"gid":
                gid = _pax_int(value, "gid")
            elif key == b"mtime":
                mtime_ns = _pax_time_ns(value)
            elif key.startswith(b"SCHILY.xattr."):
                xattrs.append((key[13:], value))
        if b"GNU.sparse.name" in pax and pax[b"GNU.sparse.name"]:
            name = pax[b"GNU.sparse.name"]
        return name, link, size, uid, gid, mtime_ns

    # ---- entry kinds

    def _count_content(self, n: int) -> None:
        self.content_bytes += n
        if self.content_bytes > self.limits.max_total_bytes:
            raise _Refused(
                f"layer content is larger than max_total_bytes ({self.limits.max_total_bytes})"
            )

    def _dispatch(self, e: _Entry, block: bytes, sparse_pax: dict | None) -> None:
        typ = e.type
        parts = e.parts
        if typ in _REG_TYPES and sparse_pax is None and parts and parts[-1][:4] != b".wh.":
            self._count_content(e.size)  # the common case, first
            self._regular(e)
            return
        # header-only types carry no data whatever their size field says (as Go's archive/tar)
        data_size = 0 if typ in _HEADER_ONLY_TYPES else e.size
        if typ in _REG_TYPES and sparse_pax is None:
            self._count_content(e.size)
        if e.parts and e.parts[-1].startswith(b".wh."):
            self._whiteout(e)
            self.s.skip(data_size + (-data_size % 512))
        elif typ in _REG_TYPES:
            if sparse_pax is not None:
                self._sparse_pax(e, sparse_pax)
            else:
                self._regular(e)
        elif typ == b"5" or typ == b"D":
            self._directory(e)
            self.s.skip(data_size + (-data_size % 512))
        elif typ == b"2":
            self._symlink(e)
        elif typ == b"1":
            self._hardlink(e)
        elif typ in (b"3", b"4", b"6"):
            self._special(e)
        elif typ == b"S":
            self._sparse_gnu(e, block)
        elif typ in (b"M", b"N"):
            raise _Refused(f"unsupported GNU tar entry type {typ!r} (multi-volume/old long name)")
        else:
            raise _Refused(f"unknown tar entry type {typ!r}")

    def _split(self, e: _Entry) -> tuple[int, bytes, bytes]:
        parts = e.parts
        if not parts:
            raise _Refused("this entry type cannot replace the layer root directory")
        key = b"/".join(parts[:-1])
        return self.tree.dir_fd(key, create=True), parts[-1], b"/".join(parts)

    def _create_file(self, e: _Entry) -> int:
        parts = e.parts
        if not parts:
            raise _Refused("this entry type cannot replace the layer root directory")
        base = parts[-1]
        parent = self.tree.dir_fd(b"/".join(parts[:-1]), create=True)
        try:
            return os.open(base, _FILE_FLAGS, e.mode & 0o777, dir_fd=parent)
        except FileExistsError:
            self.tree.remove(parent, base, b"/".join(parts))
            return os.open(base, _FILE_FLAGS, e.mode & 0o777, dir_fd=parent)

    def _finish_file(self, fd: int, e: _Entry) -> None:
        tree = self.tree
        # skip the syscalls that would change nothing: the file is ours already,
        # and open() applied the mode unless the umask or special bits got in the way
        chowned = tree.privileged and (e.uid != tree.uid or e.gid != tree.gid)
        if chowned:
            os.fchown(fd, e.uid, e.gid)
        if chowned or e.mode & tree.chmod_mask:
            os.fchmod(fd, e.mode)
        if e.xattrs:
            tree.set_xattrs(fd, e.xattrs)
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))

    def _regular(self, e: _Entry) -> None:
        fd = self._create_file(e)
        try:
            size = e.size
            if size:
                self.s.copy_to(fd, size)
                self.s.skip(-size % 512)
            self._finish_file(fd, e)
        finally:
            os.close(fd)

    def _directory(self, e: _Entry) -> None:
        tree = self.tree
        parts = e.parts
        if not parts:
            fd, key = tree.root_fd, b""
        else:
            parent, base, key = self._split(e)
            try:
                os.mkdir(base, 0o700, dir_fd=parent)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(base, dir_fd=parent).st_mode):
                    tree.remove(parent, base, key)
                    os.mkdir(base, 0o700, dir_fd=parent)
            fd = tree.dir_fd(key, create=False)
        if tree.chown_needed(e.uid, e.gid):
            os.fchown(fd, e.uid, e.gid)
        if e.xattrs:
            tree.set_xattrs(fd, e.xattrs)
        # mode and mtime last: children change the mtime, and a read-only mode
        # would stop an unprivileged extraction from filling the directory
        tree.deferred_dirs[key] = (e.mode, e.mtime_ns)

    def _symlink(self, e: _Entry) -> None:
        target = e.linkname
        if not target:
            raise _Refused("symlink with an empty target")
        if b"\0" in target:
            raise _Refused("symlink target contains a NUL byte")
        if len(target) > self.limits.max_path_bytes:
            raise _Refused(f"symlink target is longer than {self.limits.max_path_bytes} bytes")
        parent, base, key = self._split(e)
        try:
            os.symlink(target, base, dir_fd=parent)
        except FileExistsError:
            self.tree.remove(parent, base, key)
            os.symlink(target, base, dir_fd=parent)
        tree = self.tree
        if tree.chown_needed(e.uid, e.gid):
            os.chown(base, e.uid, e.gid, dir_fd=parent, follow_symlinks=False)
        if e.xattrs:
            tree.set_xattrs(tree.node_path(parent, base), e.xattrs)
        os.utime(base, ns=(e.mtime_ns, e.mtime_ns), dir_fd=parent, follow_symlinks=False)

    def _hardlink(self, e: _Entry) -> None:
        tparts = self.clean(e.linkname, "hardlink target")
        if not tparts:
            raise _Refused("hardlink to the layer root")
        if tparts == e.parts:
            raise _Refused("hardlink to itself")
        tree = self.tree
        tparent = tree.dir_fd(b"/".join(tparts[:-1]), create=False)
        tbase = tparts[-1]
        try:
            st = os.lstat(tbase, dir_fd=tparent)
        except FileNotFoundError:
            raise _Refused(
                f"hardlink target {_show(e.linkname)!r} is not an entry of this layer"
            ) from None
        if stat.S_ISDIR(st.st_mode):
            raise _Refused(f"hardlink target {_show(e.linkname)!r} is a directory")
        parent, base, key = self._split(e)
        try:
            os.link(tbase, base, src_dir_fd=tparent, dst_dir_fd=parent, follow_symlinks=False)
        except FileExistsError:
            tree.remove(parent, base, key)
            # removing a directory closes the fds under it: the target's may be one
            tparent = tree.dir_fd(b"/".join(tparts[:-1]), create=False)
            os.link(tbase, base, src_dir_fd=tparent, dst_dir_fd=parent, follow_symlinks=False)

    def _special(self, e: _Entry) -> None:
        tree = self.tree
        if e.type == b"6":
            kind, dev = stat.S_IFIFO, 0
        else:
            if not tree.can_mknod:
                tree.notes.append(f"device {_show(e.name)} skipped: not privileged")
                return
            kind = stat.S_IFCHR if e.type == b"3" else stat.S_IFBLK
            dev = os.makedev(e.devmajor, e.devminor)
        parent, base, key = self._split(e)
        try:
            os.mknod(base, kind | (e.mode & 0o777), dev, dir_fd=parent)
        except FileExistsError:
            tree.remove(parent, base, key)
            os.mknod(base, kind | (e.mode & 0o777), dev, dir_fd=parent)
        except PermissionError:
            if kind == stat.S_IFIFO:
                raise
            tree.can_mknod = False
            tree.notes.append(f"device {_show(e.name)} skipped: mknod not permitted")
            return
        self._node_metadata(parent, base, e)

    def _node_metadata(self, parent: int, base: bytes, e: _Entry) -> None:
        tree = self.tree
        if tree.chown_needed(e.uid, e.gid):
            os.chown(base, e.uid, e.gid, dir_fd=parent, follow_symlinks=False)
        fd = os.open(base, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise _Refused("node turned into a symlink")
            # chmod through the O_PATH fd's /proc link: acts on this inode, never a target
            os.chmod(b"/proc/self/fd/%d" % fd, e.mode)
        finally:
            os.close(fd)
        if e.xattrs:
            tree.set_xattrs(tree.node_path(parent, base), e.xattrs)
        os.utime(base, ns=(e.mtime_ns, e.mtime_ns), dir_fd=parent, follow_symlinks=False)

    def _whiteout(self, e: _Entry) -> None:
        tree = self.tree
        parts = e.parts
        base = parts[-1]
        dir_key = b"/".join(parts[:-1])
        if base == b".wh..wh..opq":
            fd = tree.dir_fd(dir_key, create=True)
            try:
                os.setxattr(fd, tree.opaque_xattr, b"y")
            except OSError as err:
                raise _Refused(f"cannot mark the directory opaque: {err.strerror}") from None
            return
        if base.startswith(b".wh..wh."):
            raise _Refused("AUFS metadata whiteouts (.wh..wh.*) are not supported")
        hidden = base[4:]
        if hidden in (b"", b".", b".."):
            raise _Refused(f"whiteout {_show(base)!r} names no file")
        parent = tree.dir_fd(dir_key, create=True)
        key = dir_key + b"/" + hidden if dir_key else hidden
        tree.remove(parent, hidden, key)
        try:
            os.mknod(hidden, stat.S_IFCHR, os.makedev(0, 0), dir_fd=parent)
        except OSError as err:
            raise _Refused(f"cannot create the overlay whiteout: {err.strerror}") from None
        if tree.privileged and (tree.uid or tree.gid):
            os.chown(hidden, 0, 0, dir_fd=parent, follow_symlinks=False)

    # ---- sparse files

    def _sparse_gnu(self, e: _Entry, block: bytes) -> None:
        """Old GNU sparse ('S'): the map is in the header and in extension blocks."""
        realsize = _num(block[483:495], "realsize")
        entries: list[tuple[int, int]] = []
        self._gnu_sparse_map(block[386:482], entries)
        extended = block[482]
        blocks = 0
        while extended:
            blocks += 1
            if blocks * 512 > self.limits.max_header_bytes:
                raise _Refused("sparse map is over the header size limit")
            ext = self.s.read(512)
            self._gnu_sparse_map(ext[:504], entries)
            extended = ext[504]
        self._write_sparse(e, realsize, entries, e.size)

    @staticmethod
    def _gnu_sparse_map(area: bytes, out: list[tuple[int, int]]) -> None:
        for i in range(0, len(area) - 23, 24):
            off_f, n_f = area[i : i + 12], area[i + 12 : i + 24]
            if not off_f.strip(b"\0"):
                break
            out.append((_num(off_f, "sparse offset"), _num(n_f, "sparse size")))

    def _sparse_pax(self, e: _Entry, pax: dict[bytes, bytes]) -> None:
        major = pax.get(b"GNU.sparse.major")
        minor = pax.get(b"GNU.sparse.minor")
        if major == b"1" and minor == b"0":
            realsize = _pax_int(pax.get(b"GNU.sparse.realsize", b""), "GNU.sparse.realsize")
            self._count_content(realsize)
            entries, map_bytes = self._read_pax1_map(e.size)
            self._write_sparse(e, realsize, entries, e.size - map_bytes, counted=True)
        elif b"GNU.sparse.map" in pax:  # 0.1 (one map record) and 0.0 (offset/numbytes pairs)
            realsize = _pax_int(pax.get(b"GNU.sparse.size", b""), "GNU.sparse.size")
            nums = pax[b"GNU.sparse.map"].split(b",")
            if len(nums) % 2:
                raise _Refused("malformed GNU.sparse.map")
            vals = [_pax_int(x, "GNU.sparse.map") for x in nums]
            entries = list(zip(vals[0::2], vals[1::2], strict=True))
            self._write_sparse(e, realsize, entries, e.size)
        else:
            raise _Refused("unsupported GNU sparse format (no map)")

    def _read_pax1_map(self, size: int) -> tuple[list[tuple[int, int]], int]:
        data = b""
        numbers: list[int] = []
        want = None
        pos = 0
        while want is None or len(numbers) < want:
            nl = data.find(b"\n", pos)
            if nl < 0:
                if len(data) + 512 > min(size, self.limits.max_header_bytes):
                    raise _Refused("sparse map is malformed or over the header size limit")
                data += self.s.read(512)
                continue
            numbers.append(_pax_int(data[pos:nl], "sparse map"))
            pos = nl + 1
            if want is None:
                want = 1 + 2 * numbers[0]
        vals = numbers[1:]
        return list(zip(vals[0::2], vals[1::2], strict=True)), len(data)

    def _write_sparse(self, e: _Entry, realsize: int, entries: list[tuple[int, int]],
                      stored: int, counted: bool = False) -> None:
        if not counted:
            self._count_content(realsize)
        if realsize < 0 or stored < 0:
            raise _Refused("negative sparse size")
        end = 0
        total = 0
        entries = [(off, n) for off, n in entries if n]  # empty regions only mark the end
        for off, n in entries:
            if off < end or n < 0 or off + n > realsize:
                raise _Refused("sparse map has overlapping or out-of-range regions")
            end = off + n
            total += n
        if total != stored:
            raise _Refused(f"sparse map covers {total} bytes but the entry stores {stored}")
        fd = self._create_file(e)
        try:
            for off, n in entries:
                if n:
                    self.s.copy_to(fd, n, offset=off)
            self.s.skip(-e.size % 512)
            os.ftruncate(fd, realsize)
            self._finish_file(fd, e)
        finally:
            os.close(fd)


def _finish_directories(tree: _LayerTree) -> None:
    """Apply directory modes and mtimes, deepest first (after all children exist)."""
    for key in sorted(tree.deferred_dirs, key=lambda k: -k.count(b"/") - (1 if k else 0)):
        mode, mtime_ns = tree.deferred_dirs[key]
        tree.trim_cache()
        try:
            fd = tree.dir_fd(key, create=False)
        except (_Refused, OSError):
            continue  # replaced by a non-directory later in the layer
        os.fchmod(fd, mode)
        os.utime(fd, ns=(mtime_ns, mtime_ns))


def _remove_tree(path: str) -> None:
    if not os.path.lexists(path):
        return
    if os.geteuid() != 0:
        # unprivileged, a read-only directory would stop the removal of its children
        for top, dirs, _files in os.walk(path):
            for d in dirs:
                p = os.path.join(top, d)
                if not os.path.islink(p):
                    os.chmod(p, 0o700)
    shutil.rmtree(path)


def extract_layer(
    blob: BinaryIO,
    media_type: str,
    dest: str | os.PathLike,
    *,
    expected_diff_id: str | None,
    layer_digest: str | None = None,
    limits: ExtractLimits | None = None,
) -> ExtractResult:
    """Extract the layer ``blob`` into the new directory ``dest`` (overlay format).

    On any failure ``dest`` is removed and LayerError is raised; ``dest`` must
    not exist beforehand. ``limits`` default to ``limits_from_env()``.
    """
    layer = layer_digest
    if limits is None:
        limits = limits_from_env()
    if expected_diff_id is not None:
        try:
            validate_digest(expected_diff_id)
        except DigestError as e:
            raise LayerError(f"invalid expected diff_id: {e}", layer=layer) from None
    if not is_layer_media_type(media_type):
        raise LayerError(f"unknown layer media type {media_type!r}", layer=layer)
    dest = os.fspath(dest)
    try:
        os.mkdir(dest, 0o755)
    except FileExistsError:
        raise LayerError(f"destination {dest} already exists", layer=layer) from None
    except OSError as e:
        raise LayerError(f"cannot create {dest}: {e.strerror}", layer=layer) from None

    pump: _Pump | None = None
    tree: _LayerTree | None = None
    extractor: _Extractor | None = None
    try:
        tree = _LayerTree(os.open(dest, _DIR_FLAGS))
        os.fchmod(tree.root_fd, 0o755)  # whatever the umask
        pump = _Pump(blob, media_type, limits)
        pump.start()
        extractor = _Extractor(_ChunkStream(pump.queue), tree, limits)
        extractor.run()
        pump.join()
        diff_id = "sha256:" + pump.hash.hexdigest()
        if expected_diff_id is not None and diff_id != expected_diff_id:
            raise _Refused(f"diff_id mismatch: expected {expected_diff_id}, got {diff_id}")
        _finish_directories(tree)
        result = ExtractResult(diff_id, pump.total, extractor.entries, tuple(tree.notes))
    except BaseException as e:
        entry = None
        if extractor is not None and extractor.current is not None:
            entry = _show(extractor.current)
        if pump is not None:
            pump.shutdown()
        if tree is not None:
            tree.close()
            os.close(tree.root_fd)
            tree = None
        cleanup = ""
        try:
            _remove_tree(dest)
        except OSError as err:
            cleanup = f" (and removing the partial layer {dest} failed: {err})"
        if isinstance(e, _Refused | StreamError):
            raise LayerError(f"{e}{cleanup}", layer=layer, entry=entry) from None
        if isinstance(e, OSError):
            raise LayerError(f"extraction failed: {e}{cleanup}", layer=layer, entry=entry) from e
        if isinstance(e, KilnError) and not isinstance(e, LayerError):
            raise  # the source's own failure (a registry timing out, a digest mismatch)
        if isinstance(e, Exception) and not isinstance(e, LayerError):
            raise LayerError(f"extraction failed: {e!r}{cleanup}", layer=layer, entry=entry) from e
        raise
    finally:
        if tree is not None:
            tree.close()
            os.close(tree.root_fd)
    return result


__all__ = ["DEFAULT_LIMITS", "LIMIT_VARIABLES", "ExtractLimits", "ExtractResult", "extract_layer",
           "limits_from_env"]
