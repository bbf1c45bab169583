import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from store.errors import DigestError, NotFoundError, StoreError
from store.store import Store


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_store_root_is_an_oci_layout_with_kiln_dirs(store):
    root = store.root
    assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((root / "index.json").read_text())
    assert index["schemaVersion"] == 2 and index["manifests"] == []
    for sub in ("blobs/sha256", "layers", "cache", "containers", "tmp", "locks", "keys"):
        assert (root / sub).is_dir(), sub


def test_put_blob_streams_and_returns_descriptor(store):
    data = os.urandom(3 << 20)
    desc = store.put_blob(io.BytesIO(data), "application/octet-stream")
    assert desc.digest == digest_of(data) and desc.size == len(data)
    assert (store.root / "blobs/sha256" / desc.digest[7:]).read_bytes() == data
    with store.open_blob(desc.digest, desc.size) as r:
        assert r.read() == data


def _nothing_left(store, digest):
    assert not (store.root / "blobs/sha256" / digest[7:]).exists()
    assert list(store.tmp.iterdir()) == []


def test_wrong_digest_leaves_nothing(store):
    data = b"hello world"
    wrong = digest_of(b"something else")
    with pytest.raises(DigestError, match="does not match"):
        store.put_blob(io.BytesIO(data), "x/y", digest=wrong)
    _nothing_left(store, wrong)
    _nothing_left(store, digest_of(data))


@pytest.mark.parametrize("delta", [-1, +1])
def test_one_byte_short_or_long_of_declared_size(store, delta):
    data = b"0123456789" * 100
    with pytest.raises(DigestError, match="size"):
        store.put_blob(io.BytesIO(data), "x/y", digest=digest_of(data), size=len(data) + delta)
    _nothing_left(store, digest_of(data))


def test_interrupted_stream_leaves_nothing(store):
    class Broken(io.RawIOBase):
        def __init__(self):
            self.n = 0

        def readinto(self, b):
            self.n += 1
            if self.n > 3:
                raise ConnectionError("peer went away")
            b[:1000] = b"x" * 1000
            return 1000

    with pytest.raises(ConnectionError):
        store.put_blob(Broken(), "x/y", digest=digest_of(b"x" * 10000), size=10000)
    _nothing_left(store, digest_of(b"x" * 10000))


@pytest.mark.parametrize("bad", ["sha256:../../x", "sha256:" + "A" * 64, "sha256:" + "a" * 63,
                                 "sha512:" + "a" * 128, "sha256:" + "a" * 64 + "/..", "../x"])
def test_malformed_digests_never_form_a_path(store, bad):
    with pytest.raises(DigestError, match="invalid digest"):
        store.layout.blob_path(bad)
    with pytest.raises(DigestError):
        store.put_blob(io.BytesIO(b"x"), "x/y", digest=bad)
    with pytest.raises(DigestError):
        store.read_blob(bad)


def test_reads_verify_content_and_size(store):
    data = b'{"a": 1}'
    desc = store.put_bytes(data, "application/json")
    path = store.root / "blobs/sha256" / desc.digest[7:]
    assert store.read_blob(desc.digest, desc.size) == data
    with pytest.raises(DigestError, match="declared size"):
        store.read_blob(desc.digest, desc.size + 1)
    os.chmod(path, 0o644)
    path.write_bytes(b'{"a": 2}')  # corrupted at rest
    with pytest.raises(DigestError, match="does not match"):
        store.read_blob(desc.digest)
    with pytest.raises(DigestError), store.open_blob(desc.digest) as r:
        r.read()


def test_missing_blob_is_a_clear_error(store):
    with pytest.raises(NotFoundError, match="not in"):
        store.read_blob(digest_of(b"nope"))


def test_oversized_documents_are_refused_on_read(store):
    desc = store.put_bytes(b" " * (4 * 1024 * 1024 + 1), "application/json")
    with pytest.raises(StoreError, match="limit"):
        store.read_blob(desc.digest)


def test_killed_writer_leaves_only_tmp_garbage_that_the_next_start_removes(tmp_path):
    root = tmp_path / "root"
    Store(root)
    code = f"""
import sys, time
sys.path.insert(0, {str(os.getcwd())!r})
from store.store import Store
s = Store({str(root)!r})
class Slow:
    def read(self, n=-1):
        print("writing", flush=True)
        time.sleep(0.05)
        return b"x" * 65536
s.put_blob(Slow(), "x/y")
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert p.stdout.readline() == b"writing\n"
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert os.listdir(root / "blobs/sha256") == []
    assert os.listdir(root / "tmp") != []  # the partial write stayed in tmp/
    Store(root)  # next start, no writer active: garbage goes
    assert os.listdir(root / "tmp") == []
