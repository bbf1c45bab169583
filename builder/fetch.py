"""ADD <url>: download to a file in the step's work dir, verified and bounded.

As BuildKit's HTTP source: the file is named after the URL's path (``__unnamed__`` when it
has none), gets mode 0600 and the ``Last-Modified`` time, and is never extracted.
``--checksum=sha256:<hex>`` (sha384/sha512 too) is checked as the bytes stream past; with
it the step's cache key is the checksum, so a rebuild asks the server nothing. Without it
the server's validators (ETag, Last-Modified) are remembered under
``<store>/cache/http/`` and a rebuild asks with If-None-Match: a 304 costs no download.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import urllib.parse
from dataclasses import dataclass

from store.errors import KilnError

MAX_FETCH_BYTES = 16 << 30
CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 300.0
_ALGORITHMS = {"sha256": 64, "sha384": 96, "sha512": 128}


class FetchError(KilnError):
    pass


@dataclass(frozen=True)
class Fetched:
    url: str
    filename: str
    digest: str  # "sha256:<hex>" of the content (or of the algorithm --checksum named)
    path: str | None  # the downloaded file; None when the server said 304 Not Modified
    mtime: int | None = None


def url_filename(url: str) -> str:
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    base = posixpath.basename(path.rstrip("/")) if path.rstrip("/") else ""
    return base if base not in ("", ".", "..") else "__unnamed__"


def parse_checksum(text: str) -> tuple[str, str]:
    algo, _, hexdigest = text.partition(":")
    if algo not in _ALGORITHMS or not re.fullmatch(f"[0-9a-f]{{{_ALGORITHMS[algo]}}}",
                                                    hexdigest):
        raise FetchError(f"invalid --checksum {text!r}: want sha256:<64 hex digits> "
                         "(or sha384:/sha512:)")
    return algo, hexdigest


def _record_path(cache_dir: str, url: str) -> str:
    return os.path.join(cache_dir, "http",
                        hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()
                        + ".json")


def _load_record(cache_dir: str, url: str) -> dict | None:
    try:
        with open(_record_path(cache_dir, url), "rb") as f:
            rec = json.loads(f.read(1 << 16))
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("url") != url or not isinstance(
            rec.get("digest"), str):
        return None
    return rec


def _save_record(cache_dir: str, tmp_dir: str, url: str, digest: str, headers) -> None:
    from store.fsutil import atomic_write

    etag, modified = headers.get("ETag"), headers.get("Last-Modified")
    if not etag and not modified:
        return
    path = _record_path(cache_dir, url)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rec = {"url": url, "digest": digest, "etag": etag, "last_modified": modified}
    atomic_write(path, json.dumps(rec, sort_keys=True).encode(), tmp_dir=tmp_dir,
                 durable=False)


def _mtime(headers) -> int | None:
    value = headers.get("Last-Modified")
    if not value:
        return None
    try:
        import email.utils  # only when a server sent Last-Modified

        return int(email.utils.parsedate_to_datetime(value).timestamp())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def fetch(url: str, dest_dir: str, *, checksum: str | None = None,
          cache_dir: str | None = None, tmp_dir: str | None = None, conditional: bool = False,
          max_bytes: int = MAX_FETCH_BYTES) -> Fetched:
    """GET ``url`` into ``dest_dir``/<name from the URL> (mode 0600, mtime Last-Modified).

    ``conditional`` (needs ``cache_dir``) sends the validators remembered for the URL; when
    the server answers 304 the result has ``path=None`` and the remembered digest."""
    import requests

    filename = url_filename(url)
    algo, want = parse_checksum(checksum) if checksum else ("sha256", None)
    headers = {"User-Agent": "kiln"}
    record = _load_record(cache_dir, url) if conditional and cache_dir else None
    if record:
        if record.get("etag"):
            headers["If-None-Match"] = record["etag"]
        if record.get("last_modified"):
            headers["If-Modified-Since"] = record["last_modified"]
    try:
        resp = requests.get(url, headers=headers, stream=True,
                            timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
    except requests.RequestException as e:
        raise FetchError(f"ADD {url}: {e}") from None
    with resp:
        if resp.status_code == 304 and record:
            return Fetched(url, filename, record["digest"], None, _mtime(resp.headers))
        if resp.status_code >= 400 or resp.status_code == 304:
            raise FetchError(f"ADD {url}: the server answered {resp.status_code} "
                             f"{resp.reason or ''}".rstrip())
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > max_bytes:
            raise FetchError(f"ADD {url}: {length} bytes is more than the limit of "
                             f"{max_bytes}")
        os.makedirs(dest_dir, 0o700, exist_ok=True)
        path = os.path.join(dest_dir, filename)
        h = hashlib.new(algo)
        size = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in resp.iter_content(1 << 20):
                    size += len(chunk)
                    if size > max_bytes:
                        raise FetchError(f"ADD {url}: more than the limit of {max_bytes} bytes")
                    h.update(chunk)
                    out.write(chunk)
        except requests.RequestException as e:
            raise FetchError(f"ADD {url}: the download failed: {e}") from None
        got = f"{algo}:{h.hexdigest()}"
        if want is not None and h.hexdigest() != want:
            os.unlink(path)
            raise FetchError(f"ADD {url}: checksum mismatch: expected {algo}:{want}, got {got}")
        mtime = _mtime(resp.headers)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        if cache_dir and tmp_dir and want is None:
            _save_record(cache_dir, tmp_dir, url, got, resp.headers)
        return Fetched(url, filename, got, path, mtime)
