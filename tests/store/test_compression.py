import gzip
import io

import pytest
import zstandard

from store.compression import compression_for, decompressing_reader
from store.errors import LayerError

DATA = b"layer bytes " * 50_000


@pytest.mark.parametrize("blob", [
    gzip.compress(DATA[:1000]) + gzip.compress(DATA[1000:]),  # concatenated members
    zstandard.ZstdCompressor().compress(DATA[:1000]) + zstandard.ZstdCompressor().compress(
        DATA[1000:]),  # concatenated frames
    DATA,
])
def test_reads_every_form_back(blob):
    assert decompressing_reader(io.BytesIO(blob)).read() == DATA


@pytest.mark.parametrize("blob, message", [
    (gzip.compress(DATA)[:-9], "truncated"),
    (zstandard.ZstdCompressor().compress(DATA)[:-9], "truncated"),
    (zstandard.ZstdCompressor().compress(DATA) + b"junk", "after"),
    (b"\x28\xb5\x2f\xfd\x00" + bytes([21 << 3]) + b"\x01\x00\x00", "window"),  # window log 31
])
def test_bad_streams_are_errors_not_short_reads(blob, message):
    with pytest.raises(LayerError, match=message):
        decompressing_reader(io.BytesIO(blob)).read()


def test_magic_bytes_decide_over_the_media_type():
    gz = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert compression_for(gz, b"ustar-ish") == "none"
    assert compression_for(gz, b"\x28\xb5\x2f\xfd") == "zstd"
    with pytest.raises(LayerError, match="unsupported layer media type"):
        compression_for("text/plain", b"")
