"""One repository on a registry: manifests and blobs, read and written.

Reading: manifests are capped at 4 MiB and checked against their digest (the
requested one, and the one computed from the body); blobs stream through a
reader that resumes with Range after a dropped connection and never trusts
Content-Length, wrapped by the store's VerifyingReader for size and digest.
Writing: HEAD first, cross-repository mount, monolithic or chunked upload,
manifest PUT with its exact media type.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlencode

import requests

from registry_client.errors import NotFoundOnRegistry, RegistryError
from registry_client.transport import RegistryOptions, RegistryTransport, read_body
from store import interrupt
from store.digest import VerifyingReader, sha256_digest, validate_digest
from store.documents import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_SCHEMA1,
    INDEX_MEDIA_TYPES,
    MAX_DOCUMENT_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    parse_any,
)
from store.errors import DigestError
from store.image import ManifestImage
from store.reference import Reference

MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])
_TRANSIENT = (requests.RequestException, OSError)


def _urllib3_errors() -> tuple[type[BaseException], ...]:
    from urllib3.exceptions import HTTPError

    return (HTTPError, *_TRANSIENT)


@dataclass
class Manifest:
    raw: bytes
    descriptor: Descriptor

    @property
    def is_index(self) -> bool:
        return self.descriptor.media_type in INDEX_MEDIA_TYPES


class RemoteRepository:
    def __init__(self, transport: RegistryTransport, repository: str):
        self.transport = transport
        self.repository = repository
        self.options = transport.options

    @classmethod
    def for_reference(cls, ref: Reference, options: RegistryOptions | None = None
                      ) -> RemoteRepository:
        options = options or RegistryOptions()
        return cls(RegistryTransport(ref.registry, options, repository=ref.repository),
                   ref.repository)

    def scopes(self, push: bool = False) -> tuple[str, ...]:
        return (f"repository:{self.repository}:{'pull,push' if push else 'pull'}",)

    def _path(self, kind: str, ref: str) -> str:
        return f"/v2/{self.repository}/{kind}/{ref}"

    # -- manifests ----------------------------------------------------------
    def get_manifest(self, reference: str) -> Manifest:
        """By tag or digest; the body is checked against the digest asked for (or, for a
        tag, the Docker-Content-Digest the registry sent)."""
        want = validate_digest(reference) if reference.startswith("sha256:") else None
        resp = self.transport.request(
            "GET", self._path("manifests", reference), scopes=self.scopes(),
            headers={"Accept": MANIFEST_ACCEPT}, what="manifest fetch", digest=want)
        with resp:
            raw = read_body(resp, limit=MAX_DOCUMENT_BYTES, what=f"manifest {reference}",
                            deadline=time.monotonic() + self.options.deadline_for(
                                MAX_DOCUMENT_BYTES))
            url = resp.url
            header_type = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
            header_digest = resp.headers.get("Docker-Content-Digest")
        got = sha256_digest(raw)
        if want is not None and got != want:
            raise RegistryError(f"manifest does not match the digest asked for (got {got})",
                                url=url, digest=want)
        if want is None and header_digest and header_digest.startswith("sha256:") and (
                header_digest != got):
            raise RegistryError(f"manifest does not match the Docker-Content-Digest the "
                                f"registry sent ({header_digest}; the body is {got})", url=url)
        if header_type in DOCKER_SCHEMA1:
            raise RegistryError("Docker schema1 manifests are not supported (deprecated since "
                                "2017; push the image again with a current tool)", url=url)
        try:
            media_type, doc = parse_any(raw, header_type if header_type in (
                OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST) else None)
        except Exception as e:  # ManifestError, mostly; named with the URL here
            raise RegistryError(f"invalid manifest: {e}", url=url, digest=got) from None
        if media_type not in (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST):
            raise RegistryError(f"not an image manifest or index: {media_type}", url=url,
                                digest=got)
        return Manifest(raw, Descriptor(media_type, got, len(raw)))

    def head_manifest(self, reference: str) -> Descriptor | None:
        try:
            resp = self.transport.request(
                "HEAD", self._path("manifests", reference), scopes=self.scopes(),
                headers={"Accept": MANIFEST_ACCEPT}, what="manifest check")
        except NotFoundOnRegistry:
            return None
        with resp:
            digest = resp.headers.get("Docker-Content-Digest")
            media_type = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
            size = resp.headers.get("Content-Length")
        if not digest or not size or not size.isdigit():
            return None
        try:
            return Descriptor(media_type, validate_digest(digest), int(size))
        except DigestError:
            return None

    def image(self, manifest: Manifest) -> ManifestImage:
        return ManifestImage(manifest.raw, manifest.descriptor, self.read_blob, self.open_blob)

    # -- blobs ---------------------------------------------------------------
    def blob_exists(self, digest: str, *, push: bool = False) -> bool:
        try:
            resp = self.transport.request("HEAD", self._path("blobs", digest),
                                          scopes=self.scopes(push), what="blob check",
                                          digest=digest)
        except NotFoundOnRegistry:
            return False
        resp.close()
        return True

    def blob_url(self, digest: str) -> str:
        return self.transport.url(self._path("blobs", digest))

    def open_blob(self, digest: str, size: int | None) -> VerifyingReader:
        return VerifyingReader(_BlobStream(self, validate_digest(digest), size), digest, size)

    def read_blob(self, digest: str, size: int | None) -> bytes:
        if size is not None and size > MAX_DOCUMENT_BYTES:
            raise RegistryError(f"config blob is {size} bytes, over the {MAX_DOCUMENT_BYTES} "
                                "limit", digest=digest)
        with self.open_blob(digest, size) as reader:
            data = reader.read(MAX_DOCUMENT_BYTES + 1)
            if len(data) > MAX_DOCUMENT_BYTES:
                raise RegistryError(f"blob is larger than {MAX_DOCUMENT_BYTES} bytes",
                                    digest=digest)
            while chunk := reader.read(MAX_DOCUMENT_BYTES + 1 - len(data)):
                data += chunk
                if len(data) > MAX_DOCUMENT_BYTES:
                    raise RegistryError(f"blob is larger than {MAX_DOCUMENT_BYTES} bytes",
                                        digest=digest)
            return data

    # -- push ------------------------------------------------------------------
    def mount_blob(self, digest: str, from_repository: str) -> bool:
        """Cross-repository mount; True when the registry linked the blob (201)."""
        scopes = self.scopes(push=True) + (f"repository:{from_repository}:pull",)
        query = urlencode({"mount": digest, "from": from_repository})
        resp = self.transport.request(
            "POST", f"/v2/{self.repository}/blobs/uploads/?{query}", scopes=scopes,
            headers={"Content-Length": "0"}, body=b"", expect=(201, 202), what="blob mount",
            digest=digest)
        with resp:
            mounted = resp.status_code == 201
            location = resp.headers.get("Location")
        if not mounted and location:  # an upload session we do not need: cancel it
            try:
                _finish(self.transport.request("DELETE", self._abs(location), scopes=scopes,
                                       expect=(200, 204, 404), what="upload cancel"))
            except RegistryError:
                pass
        return mounted

    def upload_blob(self, stream: BinaryIO, desc: Descriptor,
                    reopen: Callable[[Descriptor], BinaryIO] | None = None) -> None:
        """Upload a blob: one PUT when small, else PATCH chunks then the closing PUT.

        ``stream`` verifies itself at EOF (a store reader). A small blob is sent from
        memory. A large one is streamed in big chunks when ``reopen`` can give a seekable
        copy of the blob for a retried chunk; without it, chunks are small and held in
        memory, so a retried request sends exactly the same bytes."""
        scopes = self.scopes(push=True)
        resp = self.transport.request(
            "POST", f"/v2/{self.repository}/blobs/uploads/", scopes=scopes,
            headers={"Content-Length": "0"}, body=b"", expect=(202,), what="upload start",
            digest=desc.digest)
        with resp:
            location = self._location(resp)
        if desc.size <= self.options.chunk_size:
            data = _read_exactly(stream, desc)
            _finish(self.transport.request(
                "PUT", _with_query(location, {"digest": desc.digest}), scopes=scopes,
                headers={"Content-Type": "application/octet-stream",
                         "Content-Length": str(len(data))},
                body=data, expect=(201,), what="blob upload", digest=desc.digest))
            return
        step = self.options.stream_chunk_size if reopen else self.options.chunk_size
        offset = 0
        while offset < desc.size:
            n = min(step, desc.size - offset)
            if reopen:
                body = _ChunkBody(stream, offset, n, desc, reopen)
            else:
                body = _read_up_to(stream, n)
                if len(body) != n:
                    raise DigestError(f"blob {desc.digest} is shorter than {desc.size} bytes")
            resp = self.transport.request(
                "PATCH", location, scopes=scopes,
                headers={"Content-Type": "application/octet-stream",
                         "Content-Range": f"{offset}-{offset + n - 1}", "Content-Length": str(n)},
                body=body, expect=(202,), what="blob chunk upload", digest=desc.digest)
            with resp:
                location = self._location(resp)
            offset += n
        if stream.read(1):  # EOF: the source checks its digest here
            raise DigestError(f"blob {desc.digest} is longer than {desc.size} bytes")
        _finish(self.transport.request(
            "PUT", _with_query(location, {"digest": desc.digest}), scopes=scopes,
            headers={"Content-Length": "0"}, body=b"", expect=(201,), what="blob upload finish",
            digest=desc.digest))

    def put_manifest(self, raw: bytes, media_type: str, reference: str) -> str:
        """PUT a manifest under a tag or its digest; returns its digest."""
        digest = sha256_digest(raw)
        resp = self.transport.request(
            "PUT", self._path("manifests", reference), scopes=self.scopes(push=True),
            headers={"Content-Type": media_type, "Content-Length": str(len(raw))}, body=raw,
            expect=(201, 200), what="manifest upload", digest=digest)
        with resp:
            sent = resp.headers.get("Docker-Content-Digest")
        if sent and sent.startswith("sha256:") and sent != digest:
            raise RegistryError(f"registry stored the manifest as {sent}", digest=digest)
        return digest

    def _abs(self, location: str) -> str:
        from urllib.parse import urljoin

        return urljoin(self.transport.base_url() + "/", location)

    def _location(self, resp: requests.Response) -> str:
        location = resp.headers.get("Location")
        if not location:
            raise RegistryError("upload answer has no Location", url=resp.url)
        return self._abs(location)


class _ChunkBody:
    """A request body factory: ``n`` bytes from ``offset``, streamed. The first attempt
    reads on from the caller's stream; a retried attempt reads a fresh, seekable copy."""

    def __init__(self, stream: BinaryIO, offset: int, n: int, desc: Descriptor,
                 reopen: Callable[[Descriptor], BinaryIO]):
        self._stream, self._offset, self._n, self._desc, self._reopen = (
            stream, offset, n, desc, reopen)
        self._attempts = 0

    def __call__(self) -> _Bounded:
        self._attempts += 1
        if self._attempts == 1:
            self._first = _Bounded(self._stream, self._n, self._desc, close=False)
            return self._first
        if self._attempts == 2:  # bring the caller's stream to the chunk's end, as if the
            left = self._n - self._first.sent  # first attempt had gone through
            while left > 0:
                got = self._stream.read(min(left, 1 << 20))
                if not got:
                    raise DigestError(f"blob {self._desc.digest} is shorter than expected")
                left -= len(got)
        f = self._reopen(self._desc)
        f.seek(self._offset)
        return _Bounded(f, self._n, self._desc, close=True)


class _Bounded:
    """``n`` bytes of a stream as an iterable with a length (requests sends it with a
    Content-Length, not chunked)."""

    def __init__(self, f: BinaryIO, n: int, desc: Descriptor, *, close: bool):
        self._f, self._n, self._desc, self._close = f, n, desc, close
        self.sent = 0

    def __len__(self) -> int:
        return self._n

    def __iter__(self):
        try:
            while self.sent < self._n:
                interrupt.check()
                data = self._f.read(min(1 << 20, self._n - self.sent))
                if not data:
                    raise DigestError(f"blob {self._desc.digest} is shorter than expected")
                self.sent += len(data)
                yield data
        finally:
            if self._close:
                self._f.close()


def _finish(resp: requests.Response) -> None:
    """Read the (empty or tiny) body so the connection goes back to the pool: closing an
    unread response drops the socket, which costs a TLS handshake per request."""
    try:
        resp.raw.read1(65536)
    except Exception:  # noqa: BLE001 - only the reuse of this connection is at stake
        pass
    resp.close()


def _read_up_to(stream: BinaryIO, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        data = stream.read(n - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _read_exactly(stream: BinaryIO, desc: Descriptor) -> bytes:
    data = _read_up_to(stream, desc.size)
    if len(data) != desc.size or stream.read(1):
        raise DigestError(f"blob {desc.digest} is not {desc.size} bytes long")
    if sha256_digest(data) != desc.digest:
        raise DigestError(f"blob {desc.digest} does not match its content")
    return data


def _with_query(url: str, params: dict) -> str:
    return url + ("&" if "?" in url else "?") + urlencode(params)


class _BlobStream(io.RawIOBase):
    """A blob's bytes; after a dropped connection or a short body it asks again with Range
    from where it stopped (bounded by the retry count and the overall deadline)."""

    def __init__(self, repo: RemoteRepository, digest: str, size: int | None):
        self._repo = repo
        self._digest = digest
        self._size = size
        self._pos = 0
        self._resp: requests.Response | None = None
        self._resumes = 0
        self._deadline = time.monotonic() + repo.options.deadline_for(size)
        self._errors = _urllib3_errors()
        self._url = ""

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        headers = {"Range": f"bytes={self._pos}-"} if self._pos else {}
        resp = self._repo.transport.request(
            "GET", self._repo._path("blobs", self._digest), scopes=self._repo.scopes(),
            headers=headers, expect=(200, 206), what="blob fetch", digest=self._digest)
        self._url = resp.url
        if self._pos and resp.status_code == 200:  # Range ignored: skip what we have
            skip = self._pos
            while skip:
                got = resp.raw.read1(min(skip, 1 << 20), decode_content=True)
                if not got:
                    resp.close()
                    raise RegistryError("blob ended early on a retry", url=self._url,
                                        digest=self._digest)
                skip -= len(got)
        elif self._pos:
            start = (resp.headers.get("Content-Range") or "").removeprefix("bytes ").split("-")[0]
            if start != str(self._pos):
                resp.close()
                raise RegistryError(f"registry answered a Range request from {self._pos} "
                                    f"with {resp.headers.get('Content-Range')!r}", url=self._url,
                                    digest=self._digest)
        self._resp = resp

    def _resume(self, why: str) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None
        interrupt.check()  # the stop shut the connection: nothing to resume
        self._resumes += 1
        if self._resumes > max(1, self._repo.options.retries):
            raise RegistryError(f"blob transfer failed {self._resumes} times ({why}) at byte "
                                f"{self._pos}", url=self._url, digest=self._digest)
        interrupt.wait(min(2.0, 0.1 * self._resumes))

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = 1 << 20
        while True:
            interrupt.check()
            if time.monotonic() > self._deadline:
                raise RegistryError(f"blob transfer timed out after "
                                    f"{self._repo.options.deadline_for(self._size):.0f} s at "
                                    f"byte {self._pos}", url=self._url, digest=self._digest)
            if self._resp is None:
                self._open()
            try:
                data = self._resp.raw.read1(n, decode_content=True)
            except self._errors as e:
                if self._size is not None and self._pos >= self._size:
                    return b""  # all the bytes it owes us are here; the digest decides
                self._resume(f"{type(e).__name__}")
                continue
            if not data and self._size is not None and self._pos < self._size:
                self._resume("short body")
                continue
            self._pos += len(data)
            return data

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None
        super().close()
