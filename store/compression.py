"""Which compression a layer uses, and the one decompressor kiln has.

Media types say what a blob should be, but registries and tools serve
uncompressed tars under gzip types often enough that the magic bytes decide.
``decompressed_chunks`` bounds its output per step (a gzip or zstd bomb never
sits in memory whole) and detects truncated streams, which zlib and libzstd's
streaming readers would otherwise end quietly.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from store.errors import LayerError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on start-up
if TYPE_CHECKING:
    from typing import BinaryIO

_NONE, _GZIP, _ZSTD = "none", "gzip", "zstd"

_LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": _NONE,
    "application/vnd.oci.image.layer.v1.tar+gzip": _GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": _ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": _NONE,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": _GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": _ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar": _NONE,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": _GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": _GZIP,
    "application/vnd.docker.image.rootfs.diff.tar.zstd": _ZSTD,
}

OCI_LAYER_FOR = {
    _NONE: "application/vnd.oci.image.layer.v1.tar",
    _GZIP: "application/vnd.oci.image.layer.v1.tar+gzip",
    _ZSTD: "application/vnd.oci.image.layer.v1.tar+zstd",
}

COMPRESSIONS = (_ZSTD, _GZIP, _NONE)

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

IN_CHUNK = 256 << 10  # compressed bytes read at a time
OUT_CHUNK = 1 << 20  # uncompressed bytes handed on at a time


class StreamError(Exception):
    """The compressed stream itself is bad: corrupt, truncated, or over a limit."""


class ExpansionError(StreamError):
    """The stream expands past its budget: a decompression bomb, or a layer too big."""


def compression_of(media_type: str) -> str:
    """'zstd', 'gzip' or 'none' for a layer media type; LayerError for anything else."""
    try:
        return _LAYER_TYPES[media_type]
    except KeyError:
        raise LayerError(f"unsupported layer media type {media_type!r}") from None


def is_layer_media_type(media_type: str) -> bool:
    return media_type in _LAYER_TYPES


def sniff_compression(head: bytes) -> str:
    if head.startswith(_GZIP_MAGIC):
        return _GZIP
    if head.startswith(_ZSTD_MAGIC) or (len(head) >= 4 and _is_skippable_magic(head[:4])):
        return _ZSTD
    return _NONE


def compression_for(media_type: str, head: bytes) -> str:
    """The compression of a blob declared as ``media_type`` whose first bytes are ``head``."""
    declared = compression_of(media_type)
    # The bytes decide: registries serve plain tars under the gzip type, and a tar
    # cannot start with these magics (they would be the first bytes of a file name).
    if head.startswith(_GZIP_MAGIC):
        return _GZIP
    if head.startswith(_ZSTD_MAGIC):
        return _ZSTD
    if declared == _ZSTD and len(head) >= 4 and _is_skippable_magic(head[:4]):
        return _ZSTD
    return _NONE


def _is_skippable_magic(b: bytes) -> bool:
    return b[1:4] == b"\x2a\x4d\x18" and 0x50 <= b[0] <= 0x5F


# --------------------------------------------------------------------------- decompression


def read_some(blob: BinaryIO, n: int) -> bytes:
    try:
        data = blob.read(n)
    except OSError as e:
        raise StreamError(f"cannot read layer blob: {e}") from e
    return data or b""


def _plain_chunks(blob: BinaryIO, head: bytes) -> Iterator[bytes]:
    if head:
        yield head
    while True:
        data = read_some(blob, OUT_CHUNK)
        if not data:
            return
        yield data


def _gzip_chunks(blob: BinaryIO, head: bytes) -> Iterator[bytes]:
    """Concatenated gzip members; output bounded per call, truncation detected."""
    d = zlib.decompressobj(wbits=31)
    in_member = True
    pending = head
    while True:
        data = pending or read_some(blob, IN_CHUNK)
        pending = b""
        if not data:
            break
        while data:
            if not in_member:
                # After a member: another member, or zero padding, else garbage.
                if data.startswith(_GZIP_MAGIC) or (len(data) == 1 and data == b"\x1f"):
                    if len(data) == 1:
                        more = read_some(blob, IN_CHUNK)
                        data += more
                        if not more:
                            raise StreamError("gzip stream is truncated")
                        continue
                    d = zlib.decompressobj(wbits=31)
                    in_member = True
                elif data.count(0) == len(data):
                    break
                else:
                    raise StreamError("trailing garbage after the gzip stream")
            try:
                out = d.decompress(data, OUT_CHUNK)
                while True:
                    if out:
                        yield out
                    if d.eof:  # the rest of the input is in unused_data (and may be in tail)
                        break
                    tail = d.unconsumed_tail
                    if not tail and len(out) < OUT_CHUNK:
                        break
                    out = d.decompress(tail, OUT_CHUNK)
            except zlib.error as e:
                raise StreamError(f"corrupt gzip stream: {e}") from e
            if d.eof:
                in_member = False
                data = d.unused_data
            else:
                data = b""
    if in_member:
        raise StreamError("gzip stream is truncated (ends inside a gzip member)")


class _ZstdFrameWalker:
    """Follows zstd frame and block headers in the compressed bytes.

    libzstd's streaming reader returns plain EOF when its input stops in the
    middle of a frame, so truncation is detected here: the stream is complete
    only if it ends exactly on a frame boundary. It also checks each frame's
    window size against the limit, for a clearer error than libzstd's.
    """

    _MAGIC, _SKIP_SIZE, _FHD, _FHD_REST, _BLOCK = range(5)

    def __init__(self, max_window_log: int):
        self._max_window = 1 << max_window_log
        self._max_window_log = max_window_log
        self._state = self._MAGIC
        self._need = 4
        self._pending = bytearray()
        self._skip = 0
        self._fhd = 0
        self._checksum = False
        self._frames = 0

    def complete(self) -> bool:
        return (
            self._frames > 0 and self._state == self._MAGIC and not self._pending
            and self._skip == 0
        )

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                k = min(self._skip, n - i)
                i += k
                self._skip -= k
                continue
            take = min(self._need - len(self._pending), n - i)
            self._pending += data[i : i + take]
            i += take
            if len(self._pending) == self._need:
                hdr = bytes(self._pending)
                self._pending.clear()
                self._header(hdr)

    def _header(self, h: bytes) -> None:
        state = self._state
        if state == self._BLOCK:
            v = int.from_bytes(h, "little")
            btype = (v >> 1) & 3
            if btype == 3:
                raise StreamError("corrupt zstd stream: reserved block type")
            self._skip = 1 if btype == 1 else v >> 3
            if v & 1:  # last block of the frame
                if self._checksum:
                    self._skip += 4
                self._state, self._need = self._MAGIC, 4
                self._frames += 1
            else:
                self._need = 3
        elif state == self._MAGIC:
            if h == _ZSTD_MAGIC:
                self._state, self._need = self._FHD, 1
            elif _is_skippable_magic(h):
                self._state, self._need = self._SKIP_SIZE, 4
            else:
                raise StreamError("corrupt zstd stream: data after the last frame is not a frame")
        elif state == self._SKIP_SIZE:
            self._skip = int.from_bytes(h, "little")
            self._state, self._need = self._MAGIC, 4
            self._frames += 1
        elif state == self._FHD:
            fhd = h[0]
            if fhd & 0x08:
                raise StreamError("corrupt zstd stream: reserved frame header bit set")
            single = (fhd >> 5) & 1
            self._fhd = fhd
            self._checksum = bool(fhd & 0x04)
            rest = (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
            rest += ((1 if single else 0), 2, 4, 8)[fhd >> 6]
            self._state, self._need = self._FHD_REST, rest  # >= 1: a window or size byte
        else:  # _FHD_REST
            fhd = self._fhd
            single = (fhd >> 5) & 1
            if not single:
                wlog = 10 + (h[0] >> 3)
                window = (1 << wlog) + ((1 << wlog) >> 3) * (h[0] & 7)
            else:
                fcs_len = ((1 if single else 0), 2, 4, 8)[fhd >> 6]
                window = int.from_bytes(h[len(h) - fcs_len :], "little")
                if fcs_len == 2:
                    window += 256
            if window > self._max_window:
                raise StreamError(
                    f"zstd frame needs a {window.bit_length() - 1 + (window & (window - 1) > 0)}"
                    f"-bit window ({window} bytes), over the limit of window log "
                    f"{self._max_window_log}"
                )
            self._state, self._need = self._BLOCK, 3


class _WalkingSource:
    """File-like wrapper handing compressed bytes to libzstd and to the frame walker."""

    def __init__(self, blob: BinaryIO, head: bytes, walker: _ZstdFrameWalker):
        self._blob = blob
        self._head = head
        self._walker = walker

    def read(self, n: int = -1) -> bytes:
        if self._head:
            data, self._head = self._head, b""
        else:
            data = read_some(self._blob, n if n and n > 0 else IN_CHUNK)
        if data:
            self._walker.feed(data)
        return data


def _zstd_chunks(blob: BinaryIO, head: bytes, max_window_log: int) -> Iterator[bytes]:
    import zstandard  # with platform and cffi's backend: only where a zstd stream is read

    walker = _ZstdFrameWalker(max_window_log)
    dctx = zstandard.ZstdDecompressor(max_window_size=1 << max_window_log)
    source = _WalkingSource(blob, head, walker)
    reader = dctx.stream_reader(source, read_size=IN_CHUNK, read_across_frames=True,
                                closefd=False)
    try:
        while True:
            out = reader.read(OUT_CHUNK)
            if not out:
                break
            yield out
    except zstandard.ZstdError as e:
        raise StreamError(f"corrupt zstd stream: {e}") from e
    if source.read(1):  # libzstd stopped before the end: never ignore what follows
        raise StreamError("unexpected data after the zstd stream")
    if not walker.complete():
        raise StreamError("zstd stream is truncated (ends inside a frame)")


def decompressed_chunks(blob: BinaryIO, compression: str, head: bytes = b"", *,
                        max_window_log: int = 27) -> Iterator[bytes]:
    """The uncompressed bytes of ``blob`` (after ``head``, already read from it) in chunks."""
    if compression == _GZIP:
        return _gzip_chunks(blob, head)
    if compression == _ZSTD:
        return _zstd_chunks(blob, head, max_window_log)
    return _plain_chunks(blob, head)


class ChunkReader(io.RawIOBase):
    """A raw stream over ``decompressed_chunks``; failures in ``catch`` become ``error``."""

    def __init__(self, chunks: Iterator[bytes], *, error: type[Exception] = LayerError,
                 catch: tuple[type[BaseException], ...] = (StreamError,), prefix: str = ""):
        self._chunks = chunks
        self._pending = memoryview(b"")
        self._error, self._catch, self._prefix = error, catch, prefix

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self._pending:
            try:
                self._pending = memoryview(next(self._chunks))
            except StopIteration:
                return 0
            except self._catch as e:
                raise self._error(f"{self._prefix}{e}") from None
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


# --------------------------------------------------------------------------- expansion budget


@dataclass(frozen=True)
class ExpansionBudget:
    """How far a compressed stream may expand before it is taken for a bomb.

    ``max_size`` caps the uncompressed bytes; past ``ratio_from`` uncompressed
    bytes, more than ``max_ratio`` uncompressed bytes per compressed byte read is
    refused (0: no ratio check). Real layers are 2-10:1; zeros are ~1000:1 in gzip
    and ~30000:1 in zstd.
    """

    max_size: int
    max_ratio: int
    ratio_from: int


class Stopped(Exception):
    """The reader was told to stop: whoever wanted the bytes is gone."""


class CountingReader:
    """Passes ``read`` through, counting the (compressed) bytes it hands out. Once ``stop``
    (an Event) is set, the next read raises Stopped: a decompressor waiting for a whole
    output chunk from a slow source ends there, not when the chunk is complete."""

    def __init__(self, raw: BinaryIO, stop=None):
        self._raw = raw
        self._stop = stop
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        if self._stop is not None and self._stop.is_set():
            raise Stopped("the reader was stopped")
        data = self._raw.read(n)
        if data:
            self.count += len(data)
        return data


def within_budget(chunks: Iterator[bytes], source: CountingReader, budget: ExpansionBudget,
                  ) -> Iterator[bytes]:
    """``chunks`` (decompressed from ``source``) until they pass ``budget``: then
    ExpansionError, before the chunk that passed it is handed on. One check per chunk."""
    out = 0
    max_size, ratio, ratio_from = budget.max_size, budget.max_ratio, budget.ratio_from
    for chunk in chunks:
        out += len(chunk)
        if out > max_size:
            raise ExpansionError(
                f"uncompressed size passes {human_size(max_size)} (max_total_bytes; "
                "KILN_MAX_LAYER_SIZE sets it)")
        if ratio and out > ratio_from and out > ratio * source.count:
            raise ExpansionError(
                f"refusing a decompression bomb: {human_size(out)} uncompressed from "
                f"{human_size(source.count)} compressed, over {ratio}:1 past "
                f"{human_size(ratio_from)} (KILN_MAX_LAYER_RATIO and KILN_LAYER_RATIO_FROM "
                "set the limit)")
        yield chunk


def human_size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def decompressing_reader(raw: BinaryIO, *, max_zstd_window_log: int = 27) -> BinaryIO:
    """A buffered reader giving the uncompressed bytes of ``raw``; the magic bytes decide."""
    head = raw.read(4) or b""
    chunks = decompressed_chunks(raw, sniff_compression(head), head,
                                 max_window_log=max_zstd_window_log)
    return io.BufferedReader(ChunkReader(chunks), OUT_CHUNK)
