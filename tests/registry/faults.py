"""A loopback reverse proxy that injects registry faults, and a second blob host.

    with FaultProxy(registry) as proxy:
        proxy.add(status(503, retry_after=1, times=2))
        client = Client(proxy.url)  # sees two 503s, then the real registry

A fault matches a request by method (regex, fullmatch; None = any) and path
(regex, re.search over path+query as the client sent it). The first unspent
matching fault, in the order added, handles the request; after `times` hits it
is spent (times=None: never). Requests no fault takes are forwarded unchanged
except for Host (set to the upstream's) and hop-by-hop headers; bodies are
streamed both ways, with Content-Length or chunked framing.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPException, HTTPResponse, HTTPSConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.registry.servers import RegistryServer, headers_dict

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection"}
CHUNK = 64 * 1024
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_ERROR_CODES = {400: "UNSUPPORTED", 401: "UNAUTHORIZED", 403: "DENIED", 404: "NAME_UNKNOWN",
                429: "TOOMANYREQUESTS", 503: "UNAVAILABLE"}


# --------------------------------------------------------------------------- faults


@dataclass
class Fault:
    kind: str
    method: str | None
    path: str
    times: int | None
    params: dict[str, Any] = field(default_factory=dict)
    hits: int = 0

    @property
    def spent(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def matches(self, method: str, path: str) -> bool:
        if self.spent:
            return False
        if self.method is not None and not re.fullmatch(self.method, method):
            return False
        return re.search(self.path, path) is not None


def drop_after(nbytes: int, *, method: str | None = "GET", path: str = "",
               times: int | None = 1) -> Fault:
    """Forward the response but close the connection after `nbytes` of its body."""
    return Fault("drop_after", method, path, times, {"nbytes": nbytes})


def status(code: int, retry_after: int | str | None = None, *, method: str | None = None,
           path: str = "", times: int | None = 1, headers: dict[str, str] | None = None,
           body: bytes | None = None) -> Fault:
    """Answer `code` (with a distribution-style JSON error body) without asking upstream."""
    return Fault("status", method, path, times,
                 {"code": code, "retry_after": retry_after, "headers": dict(headers or {}),
                  "body": body})


def corrupt_body(offset: int | None = None, *, method: str | None = "GET", path: str = "",
                 times: int | None = 1) -> Fault:
    """Flip the low bit of one body byte: at `offset`, or the middle one when the
    length is known (else the first). Length and headers stay as upstream sent them."""
    return Fault("corrupt_body", method, path, times, {"offset": offset})


def lie_content_length(delta: int, *, method: str | None = "GET", path: str = "",
                       times: int | None = 1) -> Fault:
    """Send Content-Length = real length + delta, the real body, then close the connection
    (announced with Connection: close). +N: the body ends early; -N: N extra bytes."""
    return Fault("lie_content_length", method, path, times, {"delta": delta})


def redirect_to(other_base_url: str, *, code: int = 307, method: str | None = "GET|HEAD",
                path: str = r"/blobs/sha256:", times: int | None = None) -> Fault:
    """Answer `code` with Location = other_base_url + the request's path and query."""
    return Fault("redirect_to", method, path, times,
                 {"base": other_base_url.rstrip("/"), "code": code})


def auth_loop(challenge: str = 'Basic realm="kiln-fault-proxy"', *, method: str | None = None,
              path: str = "", times: int | None = None) -> Fault:
    """Always 401 with this WWW-Authenticate challenge, whatever credentials come.
    For a Bearer loop pass e.g. bearer_challenge(token_server, "repository:x:pull")."""
    return Fault("auth_loop", method, path, times, {"challenge": challenge})


def bearer_challenge(token_server, scope: str | None = None) -> str:
    challenge = f'Bearer realm="{token_server.url}",service="{token_server.service}"'
    return challenge + (f',scope="{scope}"' if scope else "")


def oversize_manifest(size: int, *, media_type: str = OCI_MANIFEST,
                      method: str | None = "GET|HEAD", path: str = r"/manifests/",
                      times: int | None = 1) -> Fault:
    """A manifest response of exactly `size` bytes of valid JSON (padded with an
    annotation), its media type as Content-Type and a Docker-Content-Digest that
    matches the body."""
    prefix = json.dumps({
        "schemaVersion": 2, "mediaType": media_type,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + "0" * 64, "size": 2},
        "layers": [], "annotations": {"kiln.test.padding": ""}})[:-3].encode()
    suffix = b'"}}'
    pad = size - len(prefix) - len(suffix)
    if pad < 0:
        raise ValueError(f"oversize_manifest needs size >= {len(prefix) + len(suffix)}")
    h = hashlib.sha256(prefix)
    for n in _pieces(pad):
        h.update(b"a" * n)
    h.update(suffix)
    return Fault("oversize_manifest", method, path, times,
                 {"size": size, "media_type": media_type, "prefix": prefix, "suffix": suffix,
                  "digest": "sha256:" + h.hexdigest()})


def reset(*, method: str | None = None, path: str = "", times: int | None = 1) -> Fault:
    """Read the request, then reset the connection (TCP RST) without a byte of answer."""
    return Fault("reset", method, path, times)


def body(data: bytes, *, code: int = 200, content_type: str = "application/json",
         method: str | None = None, path: str = "", times: int | None = 1,
         headers: dict[str, str] | None = None) -> Fault:
    """Answer `code` with exactly this body (e.g. hostile JSON) and Content-Type, without
    asking upstream. A body of bytes is sent as it is; a callable is called per request."""
    return Fault("body", method, path, times,
                 {"code": code, "data": data, "content_type": content_type,
                  "headers": dict(headers or {})})


def slow_drip(interval: float, chunk: int = 1, *, method: str | None = "GET", path: str = "",
              times: int | None = 1, give_up_after: float | None = 30.0) -> Fault:
    """Forward the response headers at once, then `chunk` body bytes every `interval` s.
    After `give_up_after` s of dripping the proxy cuts the connection, so that a client
    whose per-read timeout never fires (bytes do keep coming) fails its test instead of
    hanging the suite."""
    return Fault("slow_drip", method, path, times,
                 {"interval": interval, "chunk": chunk, "give_up_after": give_up_after})


def stall(seconds: float = 60.0, *, method: str | None = None, path: str = "",
          times: int | None = 1) -> Fault:
    """Take the request and answer nothing for `seconds` (then cut the connection): a
    registry that hangs, with the client blocked waiting for the status line."""
    return Fault("stall", method, path, times, {"seconds": seconds})


def _pieces(total: int, size: int = CHUNK) -> Iterator[int]:
    while total > 0:
        yield min(size, total)
        total -= size


# --------------------------------------------------------------------------- servers


class _LoopbackServer:
    """A threaded HTTP/1.1 server whose connections can all be cut at close()."""

    def __init__(self, bind_host: str, handler_cls: type[BaseHTTPRequestHandler]):
        owner = self

        class Handler(handler_cls):  # type: ignore[valid-type,misc]
            server_owner = owner

        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((bind_host, 0), Handler)
        self._httpd.daemon_threads = True
        host, port = self._httpd.server_address[:2]
        self.host = f"{host}:{port}"
        self.url = f"http://{self.host}"
        self.requests: list[dict] = []
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        daemon=True, name=f"kiln-test-{type(self).__name__}")
        self._thread.start()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._httpd.shutdown()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # unblock handler threads still reading or dripping
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_owner: Any = None
    timeout = 60

    def setup(self) -> None:
        super().setup()
        with self.server_owner._lock:
            self.server_owner._conns.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        with self.server_owner._lock:
            self.server_owner._conns.discard(self.connection)

    def log_message(self, format, *args) -> None:
        pass

    def _record(self) -> dict:
        entry = {"method": self.command, "path": self.path,
                 "headers": headers_dict(self.headers.items())}
        self.server_owner.requests.append(entry)
        return entry

    def _request_body(self) -> Iterator[bytes]:
        """The request body as it arrives, de-chunked if it was chunked."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65536) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                yield from self._read_exactly(size)
                self.rfile.readline(16)
        else:
            yield from self._read_exactly(int(self.headers.get("Content-Length") or 0))

    def _read_exactly(self, n: int) -> Iterator[bytes]:
        for want in _pieces(n):
            data = self.rfile.read(want)
            if len(data) < want:
                raise ConnectionError("client closed the connection mid-body")
            yield data

    def _drain(self) -> None:
        for _ in self._request_body():
            pass

    def _send_simple(self, code: int, body: bytes = b"", headers: dict | None = None,
                     content_type: str = "application/json") -> None:
        self.send_response_only(code)
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        if body or code >= 400:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _abort(self) -> None:
        """Cut the client connection now (after flushing what was written)."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_GET(self) -> None:
        try:
            self.handle_request()
        except (ConnectionError, TimeoutError, ssl.SSLError, HTTPException):
            self.close_connection = True

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def handle_request(self) -> None:
        raise NotImplementedError


class FaultProxy(_LoopbackServer):
    """A reverse proxy on 127.0.0.1 in front of a registry, injecting `Fault`s.

    `requests` records every request as {"method", "path", "headers", "fault"}
    (headers as received, case-insensitive; fault = the kind that took it, or None).
    An https upstream is reached with its CA (`ca_pem`, taken from a RegistryServer);
    the proxy itself always speaks plain http.
    """

    def __init__(self, upstream: RegistryServer | str, *, ca_pem: Path | None = None,
                 bind_host: str = "127.0.0.1"):
        if isinstance(upstream, RegistryServer):
            ca_pem = ca_pem or upstream.ca_pem
            upstream = upstream.url
        self.upstream = upstream.rstrip("/")
        scheme, _, self.upstream_host = self.upstream.partition("://")
        self._tls = (ssl.create_default_context(cafile=str(ca_pem) if ca_pem else None)
                     if scheme == "https" else None)
        self.faults: list[Fault] = []
        super().__init__(bind_host, _ProxyHandler)

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    return fault
        return None

    def connect(self) -> HTTPConnection:
        host, _, port = self.upstream_host.rpartition(":")
        if self._tls is not None:
            return HTTPSConnection(host, int(port), timeout=60, context=self._tls)
        return HTTPConnection(host, int(port), timeout=60)

    def rewrite_location(self, location: str) -> str:
        # The registry builds absolute upload URLs from the Host header, which the proxy
        # sets to the upstream's; point them back at the proxy so the client's next
        # request (PATCH/PUT of the upload) goes through it too.
        if location.startswith(self.upstream + "/") or location == self.upstream:
            return self.url + location[len(self.upstream):]
        return location


class _ProxyHandler(_Handler):
    def handle_request(self) -> None:
        proxy: FaultProxy = self.server_owner
        entry = self._record()
        fault = proxy.take(self.command, self.path)
        entry["fault"] = fault.kind if fault else None
        if fault is not None and fault.kind in _ANSWERED_HERE:
            self._drain()
            return _ANSWERED_HERE[fault.kind](self, fault)
        upstream = proxy.connect()
        try:
            try:
                resp = self._forward(upstream)
            except OSError as e:
                self.close_connection = True
                return self._send_simple(502, json.dumps({"errors": [
                    {"code": "UNKNOWN", "message": f"FaultProxy: upstream: {e}",
                     "detail": None}]}).encode())
            self._relay(resp, fault)
        finally:
            upstream.close()

    def _forward(self, conn: HTTPConnection) -> HTTPResponse:
        proxy: FaultProxy = self.server_owner
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", proxy.upstream_host)
        for k, v in self.headers.items():
            if k.lower() not in HOP_BY_HOP | {"host", "content-length", "expect"}:
                conn.putheader(k, v)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        elif self.headers.get("Content-Length") is not None:
            conn.putheader("Content-Length", self.headers["Content-Length"])
        conn.endheaders()
        try:
            for data in self._request_body():
                conn.send(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            if chunked:
                conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # upstream answered early (e.g. 401) and closed: relay that answer
        return conn.getresponse()

    def _relay(self, resp: HTTPResponse, fault: Fault | None) -> None:
        proxy: FaultProxy = self.server_owner
        headers = [(k, proxy.rewrite_location(v) if k.lower() == "location" else v)
                   for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
        length = resp.getheader("Content-Length")
        no_body = self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200
        chunks: Iterable[bytes] = iter(lambda: resp.read(CHUNK), b"")
        kind = fault.kind if fault else None

        if kind == "lie_content_length" and not no_body:
            body = b"".join(chunks)
            lie = max(0, len(body) + fault.params["delta"])
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            # Connection: close, so that a client does not race the close by reusing
            # the connection (the lie is about the length, not about keep-alive).
            self._send_head(resp, headers + [("Content-Length", str(lie)),
                                             ("Connection", "close")])
            self.wfile.write(body)
            return self._abort()

        chunked_out = not no_body and length is None
        if chunked_out:
            headers.append(("Transfer-Encoding", "chunked"))
        self._send_head(resp, headers)
        if no_body:
            return
        if kind == "corrupt_body":
            offset = fault.params["offset"]
            if offset is None:
                offset = int(length) // 2 if length else 0
            chunks = _flip_byte(chunks, offset)
        elif kind == "slow_drip":
            chunks = self._drip(chunks, fault.params["interval"], fault.params["chunk"],
                                fault.params["give_up_after"])
        limit = fault.params["nbytes"] if kind == "drop_after" else None
        sent = 0
        for data in chunks:
            if limit is not None and sent + len(data) >= limit:
                data = data[:limit - sent]
                self._write(data, chunked_out)
                return self._abort()
            self._write(data, chunked_out)
            sent += len(data)
        if limit is not None:  # the body was no longer than nbytes: still drop the connection
            return self._abort()
        if chunked_out:
            self.wfile.write(b"0\r\n\r\n")

    def _send_head(self, resp: HTTPResponse, headers: list[tuple[str, str]]) -> None:
        self.send_response_only(resp.status, resp.reason)
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()

    def _write(self, data: bytes, chunked: bool) -> None:
        if not data:
            return
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)

    def _drip(self, chunks: Iterable[bytes], interval: float, size: int,
              give_up_after: float | None) -> Iterator[bytes]:
        stop: threading.Event = self.server_owner._stop
        deadline = None if give_up_after is None else time.monotonic() + give_up_after
        for data in chunks:
            for i in range(0, len(data), size):
                yield data[i:i + size]
                self.wfile.flush()
                if stop.wait(interval):
                    raise ConnectionError("proxy closing")
                if deadline is not None and time.monotonic() > deadline:
                    raise ConnectionError("slow_drip gave up")


def _flip_byte(chunks: Iterable[bytes], offset: int) -> Iterator[bytes]:
    pos = 0
    for data in chunks:
        if pos <= offset < pos + len(data):
            i = offset - pos
            data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]
        pos += len(data)
        yield data


def _answer_status(handler: _Handler, fault: Fault) -> None:
    code = fault.params["code"]
    body = fault.params["body"]
    if body is None:
        body = json.dumps({"errors": [{"code": _ERROR_CODES.get(code, "UNKNOWN"),
                                       "message": "injected by FaultProxy",
                                       "detail": None}]}).encode()
    headers = dict(fault.params["headers"])
    if fault.params["retry_after"] is not None:
        headers["Retry-After"] = str(fault.params["retry_after"])
    handler._send_simple(code, body, headers)


def _answer_redirect(handler: _Handler, fault: Fault) -> None:
    handler._send_simple(fault.params["code"], b"",
                         {"Location": fault.params["base"] + handler.path})


def _answer_auth_loop(handler: _Handler, fault: Fault) -> None:
    body = json.dumps({"errors": [{"code": "UNAUTHORIZED",
                                   "message": "authentication required (FaultProxy loop)",
                                   "detail": None}]}).encode()
    handler._send_simple(401, body, {"WWW-Authenticate": fault.params["challenge"]})


def _answer_oversize(handler: _Handler, fault: Fault) -> None:
    p = fault.params
    handler.send_response_only(200)
    handler.send_header("Docker-Distribution-API-Version", "registry/2.0")
    handler.send_header("Content-Type", p["media_type"])
    handler.send_header("Content-Length", str(p["size"]))
    handler.send_header("Docker-Content-Digest", p["digest"])
    handler.end_headers()
    if handler.command == "HEAD":
        return
    handler.wfile.write(p["prefix"])
    for n in _pieces(p["size"] - len(p["prefix"]) - len(p["suffix"])):
        handler.wfile.write(b"a" * n)
    handler.wfile.write(p["suffix"])


def _answer_reset(handler: _Handler, fault: Fault) -> None:
    handler.close_connection = True
    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.connection.close()  # linger 0: the close sends RST, not FIN


def _answer_body(handler: _Handler, fault: Fault) -> None:
    p = fault.params
    data = p["data"]() if callable(p["data"]) else p["data"]
    handler._send_simple(p["code"], data, p["headers"], p["content_type"])


def _answer_stall(handler: _Handler, fault: Fault) -> None:
    handler.server_owner._stop.wait(fault.params["seconds"])
    handler._abort()


_ANSWERED_HERE = {"status": _answer_status, "redirect_to": _answer_redirect,
                  "auth_loop": _answer_auth_loop, "oversize_manifest": _answer_oversize,
                  "reset": _answer_reset, "body": _answer_body, "stall": _answer_stall}


# --------------------------------------------------------------------------- blob host


class BlobHost(_LoopbackServer):
    """A second loopback server, on another host (127.0.0.2 when it can bind there), that
    serves GET/HEAD .../blobs/<digest>[?query] straight from a registry's storage dir,
    with Range support, to anyone (like a pre-signed storage URL). `requests` records
    {"method", "path", "headers"} so a test can check no credentials reached it."""

    def __init__(self, upstream: RegistryServer, *, bind_host: str = "127.0.0.2"):
        self.registry = upstream
        try:
            super().__init__(bind_host, _BlobHandler)
        except OSError:
            super().__init__("127.0.0.1", _BlobHandler)


class _BlobHandler(_Handler):
    def handle_request(self) -> None:
        self._record()
        self._drain()
        m = re.search(r"/blobs/(sha256:[0-9a-f]{64})(?:\?|$)", self.path)
        if self.command not in ("GET", "HEAD") or m is None:
            return self._send_simple(404 if m is None else 405, b'{"errors":[]}')
        blob = self.server_owner.registry.blob_path(m.group(1))
        if not blob.is_file():
            return self._send_simple(404, json.dumps({"errors": [
                {"code": "BLOB_UNKNOWN", "message": "blob unknown", "detail": m.group(1)}]}
            ).encode())
        data = blob.read_bytes()
        headers = {"Docker-Content-Digest": m.group(1), "Accept-Ranges": "bytes"}
        rng = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if rng and rng.group(1):
            start = int(rng.group(1))
            end = min(int(rng.group(2)) if rng.group(2) else len(data) - 1, len(data) - 1)
            if start >= len(data) or start > end:
                return self._send_simple(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send_simple(206, data[start:end + 1], headers,
                                     "application/octet-stream")
        self._send_simple(200, data, headers, "application/octet-stream")
