"""Digest strings and streaming verification.

A digest is validated before it is ever used to form a path, so
``sha256:../../x`` or upper-case hex can never name a file.
"""

from __future__ import annotations

import hashlib
import io
import re

from store.errors import DigestError

_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


def validate_digest(digest: object) -> str:
    """Return ``digest`` if it is ``sha256:`` + 64 lowercase hex, else raise DigestError."""
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise DigestError(f"invalid digest {digest!r}: want sha256: followed by 64 lowercase hex")
    return digest


def digest_hex(digest: str) -> str:
    """The 64-hex part of a validated sha256 digest."""
    return validate_digest(digest)[7:]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class VerifyingReader(io.RawIOBase):
    """Wraps a binary stream, hashing what passes; reading EOF checks size and digest.

    Reads past the expected size raise at once, so a blob one byte long is
    caught without reading further than one extra byte.
    """

    def __init__(self, raw, expected_digest: str, expected_size: int | None, *, what: str = "blob"):
        self._raw = raw
        self._digest = validate_digest(expected_digest)
        self._size = expected_size
        self._hash = hashlib.sha256()
        self._seen = 0
        self._what = what
        self._verified = False

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:  # read everything: EOF is reached within this call
            want = -1 if self._size is None else self._size - self._seen + 1
            data = self._raw.read(want)
            self._hash.update(data)
            self._seen += len(data)
            self.verify()
            return data
        data = self._raw.read(n)
        if not data and n != 0 and not self._verified:
            self.verify()
        if data:
            self._hash.update(data)
            self._seen += len(data)
            if self._size is not None and self._seen > self._size:
                raise DigestError(
                    f"{self._what} {self._digest} is longer than its declared size {self._size}"
                )
        return data

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    @property
    def verifies(self) -> str:
        """The digest this reader enforces when EOF is read: a consumer that reads to EOF
        need not hash the bytes again."""
        return self._digest

    def verify(self) -> None:
        """Raises DigestError if size or digest differ; called by itself when EOF is read."""
        self._verified = True
        if self._size is not None and self._seen != self._size:
            raise DigestError(
                f"{self._what} {self._digest} has {self._seen} bytes, declared size {self._size}"
            )
        got = "sha256:" + self._hash.hexdigest()
        if got != self._digest:
            raise DigestError(f"{self._what} {self._digest} does not match its content ({got})")

    def read_all_and_verify(self, chunk: int = 1 << 20) -> None:
        while self.read(chunk):
            pass

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()
