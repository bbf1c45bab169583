"""Which compression a layer uses, and streams that undo it.

Media types say what a blob should be, but registries and tools serve
uncompressed tars under gzip types often enough that the magic bytes decide.
"""

from __future__ import annotations

import io
import zlib
from typing import BinaryIO

from store.errors import LayerError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

_LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}

OCI_LAYER_FOR = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}

COMPRESSIONS = ("zstd", "gzip", "none")


def compression_of(media_type: str) -> str:
    """'zstd', 'gzip' or 'none' for a layer media type; LayerError for anything else."""
    try:
        return _LAYER_TYPES[media_type]
    except KeyError:
        raise LayerError(f"unsupported layer media type {media_type!r}") from None


def is_layer_media_type(media_type: str) -> bool:
    return media_type in _LAYER_TYPES


def sniff_compression(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


class _GzipReader(io.RawIOBase):
    """gzip decompression over a stream, with concatenated members and truncation detected."""

    def __init__(self, raw: BinaryIO, chunk: int = 1 << 20):
        self._raw = raw
        self._chunk = chunk
        self._d = zlib.decompressobj(wbits=47)
        self._pending = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self._pending and not self._eof:
            data = self._d.unconsumed_tail or self._raw.read(self._chunk)
            if not data:
                if not self._d.eof:
                    raise LayerError("gzip stream is truncated")
                self._eof = True
                break
            if self._d.eof:  # a new gzip member follows the previous one
                rest = self._d.unused_data + data
                self._d = zlib.decompressobj(wbits=47)
                data = rest
            try:
                self._pending = self._d.decompress(data, max(len(buf), 1 << 16))
            except zlib.error as e:
                raise LayerError(f"corrupt gzip stream: {e}") from None
            if self._d.eof and self._d.unused_data:
                tail = self._d.unused_data
                self._d = zlib.decompressobj(wbits=47)
                if tail.strip(b"\0"):
                    self._pending += self._d.decompress(tail, 0)
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


class _ZstdFrameTracker(io.RawIOBase):
    """Passes compressed bytes through while following zstd's frame structure.

    python-zstandard's streaming readers return a clean EOF when the input
    stops mid-frame, and its one-shot objects cannot bound their output. So
    the frames are followed here (headers and block sizes only, no
    decompression): at EOF the stream must sit on a frame boundary, and a
    frame whose window exceeds the limit is refused before it is decoded.
    """

    def __init__(self, raw: BinaryIO, max_window_log: int):
        self._raw = raw
        self._max_window = 1 << max_window_log
        self._state = "magic"
        self._need = 4  # bytes still wanted by the current element
        self._head = b""  # partial header bytes
        self._skip = 0  # payload bytes to pass without parsing
        self._frame = {}

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self._raw.read(len(buf))
        if not data:
            if self._state != "magic" or self._head or self._skip:
                raise LayerError("zstd stream is truncated")
            return 0
        self._feed(memoryview(data))
        n = len(data)
        buf[:n] = data
        return n

    def _feed(self, view: memoryview) -> None:
        i, n = 0, len(view)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
                if not self._skip:
                    self._after_skip()
                continue
            take = min(self._need - len(self._head), n - i)
            self._head += bytes(view[i : i + take])
            i += take
            if len(self._head) == self._need:
                head, self._head = self._head, b""
                self._parse(head)

    def _parse(self, head: bytes) -> None:
        state = self._state
        if state == "magic":
            magic = int.from_bytes(head, "little")
            if magic == 0xFD2FB528:
                self._state, self._need = "fhd", 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._need = "skiplen", 4
            else:
                raise LayerError("corrupt zstd stream: bad frame magic")
        elif state == "skiplen":
            self._skip = int.from_bytes(head, "little")
            self._frame = {"after": "magic"}
            if not self._skip:
                self._after_skip()
        elif state == "fhd":
            fhd = head[0]
            single = bool(fhd & 0x20)
            fcs = (0, 2, 4, 8)[fhd >> 6] or (1 if single else 0)
            did = (0, 1, 2, 4)[fhd & 3]
            self._frame = {"checksum": bool(fhd & 4), "single": single, "fcs": fcs}
            self._state, self._need = "fhrest", (0 if single else 1) + did + fcs
            if self._need == 0:
                self._state, self._need = "block", 3
        elif state == "fhrest":
            f = self._frame
            if f["single"]:
                size = int.from_bytes(head[len(head) - f["fcs"] :], "little")
                window = size + (256 if f["fcs"] == 2 else 0)
            else:
                wd = head[0]
                exp, mant = wd >> 3, wd & 7
                base = 1 << (10 + exp)
                window = base + (base >> 3) * mant
            if window > self._max_window:
                raise LayerError(
                    f"zstd frame needs a {window}-byte window, over the limit of "
                    f"{self._max_window} bytes"
                )
            self._state, self._need = "block", 3
        elif state == "block":
            bh = int.from_bytes(head, "little")
            last, btype, bsize = bh & 1, (bh >> 1) & 3, bh >> 3
            if btype == 3:
                raise LayerError("corrupt zstd stream: reserved block type")
            self._frame["last"] = bool(last)
            self._skip = 1 if btype == 1 else bsize
            self._frame["after"] = "block"
            if not self._skip:
                self._after_skip()
        elif state == "checksum":
            self._state, self._need = "magic", 4

    def _after_skip(self) -> None:
        f = self._frame
        if f.get("after") == "magic":
            self._state, self._need = "magic", 4
        elif f.get("last"):
            if f["checksum"]:
                self._state, self._need = "checksum", 4
            else:
                self._state, self._need = "magic", 4
        else:
            self._state, self._need = "block", 3


class _ZstdReader(io.RawIOBase):
    def __init__(self, raw: BinaryIO, max_window_log: int = 27):
        import zstandard

        self._zstd = zstandard
        d = zstandard.ZstdDecompressor(max_window_size=1 << max_window_log)
        tracked = io.BufferedReader(_ZstdFrameTracker(raw, max_window_log), 1 << 20)
        self._reader = d.stream_reader(tracked, read_size=1 << 20, read_across_frames=True)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        try:
            return self._reader.readinto(buf)
        except self._zstd.ZstdError as e:
            raise LayerError(f"corrupt zstd stream: {e}") from None


def decompressing_reader(
    raw: BinaryIO, compression: str | None = None, *, max_zstd_window_log: int = 27
) -> BinaryIO:
    """A buffered reader giving the uncompressed bytes of ``raw``.

    ``compression`` None means: sniff the magic bytes.
    """
    if compression is None or compression != "none":
        peek = io.BufferedReader(raw, 1 << 20) if not hasattr(raw, "peek") else raw
        head = peek.peek(4)[:4]
        sniffed = sniff_compression(head)
        raw = peek
        compression = sniffed
    if compression == "gzip":
        return io.BufferedReader(_GzipReader(raw), 1 << 20)
    if compression == "zstd":
        return io.BufferedReader(_ZstdReader(raw, max_zstd_window_log), 1 << 20)
    return raw
