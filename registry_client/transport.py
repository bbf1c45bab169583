"""HTTP to one registry: TLS, auth challenges, retries with backoff, timeouts, safe redirects.

Everything kiln sends to a registry goes through ``RegistryTransport.request``.
Bodies are always streamed (``stream=True``) and read through ``read_body`` or
the blob readers in ``remote``, which enforce size caps and the overall
deadline themselves: no Content-Length a server sends is trusted.
"""

from __future__ import annotations

import email.utils
import functools
import glob
import os
import random
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlencode, urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import ProxyManager

from registry_client.auth import (
    Challenge,
    TokenCache,
    basic_header,
    may_send_credentials,
    parse_challenges,
    same_origin,
)
from registry_client.errors import AuthError, NotFoundOnRegistry, RegistryError, UnreachableError
from store import interrupt

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})  # answers that can heal
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10
MAX_ERROR_BODY = 64 * 1024
CERTS_D = "/etc/containers/certs.d"
REGISTRIES_CONF = "/etc/containers/registries.conf"
USER_AGENT = "kiln"

Body = Callable[[], bytes | Iterable[bytes] | object] | bytes | None


@dataclass
class RegistryOptions:
    """How to talk to registries; the CLI fills it from its flags."""

    tls_verify: bool | None = None      # None: verify, except where registries.conf says insecure
    cert_dir: str | None = None         # podman's --cert-dir: *.crt CAs, *.cert/*.key client pair
    creds: str | None = None            # --creds user:pass
    authfile: str | None = None
    retries: int = 5                    # per request, on connection errors, 5xx and 429
    retry_budget: float = 60.0          # seconds of waiting between retries, at most, per request
    connect_timeout: float = 30.0
    idle_timeout: float = 60.0          # no byte for this long: the connection is dead
    overall_timeout: float | None = None  # one request incl. its body; None: from the size
    concurrency: int = 3                # layers moved at once
    # uploads larger than this go in PATCH chunks; each in-flight chunk is held in memory
    # (so a retry resends the same bytes): jobs x chunk bounds push memory
    chunk_size: int = 8 * 1024 * 1024
    # with a seekable source (the store) chunks are streamed, not held: few and large
    stream_chunk_size: int = 512 * 1024 * 1024
    certs_d: str = CERTS_D
    registries_conf: str = REGISTRIES_CONF
    env: Mapping[str, str] | None = None

    def deadline_for(self, size: int | None) -> float:
        """Seconds one transfer may take in all: generous, but finite (a slow drip ends)."""
        if self.overall_timeout is not None:
            return self.overall_timeout
        return 300.0 + (size or 0) / (256 * 1024)  # at least 256 KiB/s after five minutes


def _is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    return name == "localhost" or name.startswith("127.") or name == "::1"


def insecure_registries(path: str) -> set[str]:
    """Registries marked ``insecure = true`` in registries.conf (v2 TOML format)."""
    try:
        with open(path, "rb") as f:
            import tomllib

            conf = tomllib.load(f)
    except (OSError, ValueError):
        return set()
    out = set()
    for entry in conf.get("registry", []) or []:
        if isinstance(entry, dict) and entry.get("insecure") is True:
            loc = entry.get("location") or entry.get("prefix")
            if isinstance(loc, str):
                out.add(loc.split("/", 1)[0])
    return out


# -- stopping at once -----------------------------------------------------------------
# When kiln is stopped (store.interrupt: its Ctrl-C or SIGTERM) every socket its transports
# have open is shut, so that a thread blocked reading a response (a silent registry) or
# sending a body wakes at once; its retry loop then raises Interrupted instead of asking
# again. A TCP connect still in progress is not reached (the CLI's grace period ends it).
_open_sockets: weakref.WeakSet = weakref.WeakSet()
_open_sockets_lock = threading.Lock()


def _opened(sock: socket.socket | None) -> None:
    if sock is not None:
        with _open_sockets_lock:
            _open_sockets.add(sock)


def _shut_open_sockets() -> None:
    with _open_sockets_lock:
        sockets = list(_open_sockets)
    for sock in sockets:
        try:  # socket's own shutdown: SSLSocket's would unwrap it under its reader's feet
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:  # closed meanwhile
            pass


interrupt.on_stop(_shut_open_sockets)


class _Stoppable:
    """An urllib3 connection whose sockets are known to ``_shut_open_sockets``."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _opened(sock)  # the TCP socket: shut, it ends a TLS handshake too
        return sock

    def connect(self) -> None:
        super().connect()
        _opened(self.sock)  # https: the TLS socket, which took over the TCP one's fd


class _StoppableHTTPConnection(_Stoppable, HTTPConnection):
    pass


class _StoppableHTTPSConnection(_Stoppable, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _StoppableHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _StoppableHTTPSConnection


_STOPPABLE_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class _Adapter(HTTPAdapter):
    """requests' adapter, with connections whose sockets a stop shuts."""

    def init_poolmanager(self, *args, **kw):
        super().init_poolmanager(*args, **kw)
        self.poolmanager.pool_classes_by_scheme = _STOPPABLE_POOLS

    def proxy_manager_for(self, proxy, **kw):
        manager = super().proxy_manager_for(proxy, **kw)
        if isinstance(manager, ProxyManager):  # not SOCKS's, whose connections differ
            manager.pool_classes_by_scheme = _STOPPABLE_POOLS
        return manager


class _TLSAdapter(_Adapter):
    def __init__(self, context: ssl.SSLContext | None, **kw):
        self._context = context
        super().__init__(**kw)

    def init_poolmanager(self, *args, **kw):
        if self._context is not None:
            kw["ssl_context"] = self._context
        return super().init_poolmanager(*args, **kw)


def _tls_context(cert_dirs: list[str]) -> ssl.SSLContext | None:
    """System CAs plus the CAs and client certificate found in ``cert_dirs`` (podman rules)."""
    cas = [p for d in cert_dirs for p in sorted(glob.glob(os.path.join(d, "*.crt")))]
    certs = [p for d in cert_dirs for p in sorted(glob.glob(os.path.join(d, "*.cert")))]
    if not cas and not certs:
        return None
    ctx = ssl.create_default_context()
    for ca in cas:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as e:
            raise RegistryError(f"cannot load CA certificate {ca}: {e}") from None
    for cert in certs:
        key = cert[: -len(".cert")] + ".key"
        if not os.path.exists(key):
            raise RegistryError(f"client certificate {cert} has no key {key}")
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as e:
            raise RegistryError(f"cannot load client certificate {cert}: {e}") from None
    return ctx


@dataclass
class _Scopes:
    items: tuple[str, ...]

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.items)))


@dataclass
class RegistryTransport:
    """One registry host. Thread-safe: layers are moved by several threads at once."""

    registry: str                 # as references name it: docker.io, localhost:5000 ...
    options: RegistryOptions = field(default_factory=RegistryOptions)
    repository: str | None = None  # for namespace-specific credentials

    def __post_init__(self) -> None:
        self.endpoint = "index.docker.io" if self.registry == "docker.io" else self.registry
        self._base: str | None = None
        self._challenge: Challenge | None = None
        self._tokens = TokenCache()
        self._lock = threading.Lock()
        self._creds_loaded = False
        self._creds = None
        self._session = requests.Session()
        self._session.headers["User-Agent"] = USER_AGENT
        # A no-op auth hook: requests would otherwise add ~/.netrc credentials on its own.
        self._session.auth = lambda r: r
        if self.options.tls_verify is False:  # asked for: no warning on every request
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        cert_dirs = [self.options.cert_dir] if self.options.cert_dir else [
            os.path.join(self.options.certs_d, self.endpoint)]
        ctx = _tls_context([d for d in cert_dirs if os.path.isdir(d)])
        pool = max(4, self.options.concurrency + 2)
        adapter = _TLSAdapter(ctx, pool_connections=2, pool_maxsize=pool, max_retries=0)
        self._session.mount("https://", adapter)
        self._session.mount("http://", _Adapter(pool_connections=2, pool_maxsize=pool,
                                                max_retries=0))

    # -- where and how ---------------------------------------------------
    @functools.cached_property
    def verify_tls(self) -> bool:
        """Read once: every request, redirect and retry asks."""
        if self.options.tls_verify is not None:
            return self.options.tls_verify
        return self.endpoint not in insecure_registries(self.options.registries_conf)

    def _may_use_http(self) -> bool:
        return not self.verify_tls or _is_loopback(self.endpoint)

    def credentials(self):
        if not self._creds_loaded:
            from registry_client.credentials import find_credentials

            self._creds = find_credentials(self.registry, self.repository,
                                           creds=self.options.creds,
                                           authfile=self.options.authfile, env=self.options.env)
            self._creds_loaded = True
        return self._creds

    def set_credentials(self, creds) -> None:
        self._creds, self._creds_loaded = creds, True

    def base_url(self) -> str:
        """``https://host`` (or ``http://`` where allowed), found by pinging ``/v2/`` once."""
        with self._lock:
            if self._base is None:
                self._base = self._ping()
            return self._base

    def _ping(self) -> str:
        schemes = ["https"] + (["http"] if self._may_use_http() else [])
        last: Exception | None = None
        for scheme in schemes:
            url = f"{scheme}://{self.endpoint}/v2/"
            try:
                resp = self._with_retries("GET", url, {}, None, what="ping")
            except UnreachableError as e:
                if e.untrusted_certificate:  # TLS spoken, but not trusted: stop
                    raise UnreachableError(e.host, f"{e.reason} (trust its CA with --cert-dir "
                                           f"or /etc/containers/certs.d/{self.endpoint}/ca.crt)",
                                           url=url, untrusted_certificate=True) from None
                last = e
                continue
            except RegistryError as e:
                last = e
                continue
            with resp:
                if resp.status_code == 401:
                    found = parse_challenges(resp.headers.get("WWW-Authenticate"))
                    self._challenge = found[0] if found else None
                elif resp.status_code >= 400 and resp.status_code != 404:
                    raise self._status_error(resp, "registry ping failed")
            return f"{scheme}://{self.endpoint}"
        hint = "" if self._may_use_http() else " (plain http only with --tls-verify=false)"
        if isinstance(last, UnreachableError):  # already one line naming host and port
            raise UnreachableError(last.host, last.reason + (
                hint if last.reason.startswith("TLS") else ""), url=last.url)
        raise RegistryError(f"cannot reach registry {self.registry}: {last}{hint}")

    def url(self, path: str) -> str:
        return self.base_url() + path

    # -- requests ----------------------------------------------------------
    def request(self, method: str, path_or_url: str, *, scopes: Iterable[str] = (),
                headers: Mapping[str, str] | None = None, body: Body = None,
                params: Mapping[str, str] | None = None,
                expect: Iterable[int] = (200,), what: str = "request",
                digest: str | None = None) -> requests.Response:
        """Send one request (auth, retries, redirects handled); return the streamed response.

        A status outside ``expect`` raises RegistryError naming the URL (and ``digest``);
        404 raises NotFoundOnRegistry.
        """
        url = path_or_url if "://" in path_or_url else self.url(path_or_url)
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params)
        scope = _Scopes(tuple(scopes))
        resp = self._authorized(method, url, dict(headers or {}), body, scope, what)
        if resp.status_code not in set(expect):
            err = self._status_error(resp, f"{what} failed", digest=digest)
            resp.close()
            raise err
        return resp

    def _authorized(self, method: str, url: str, headers: dict, body: Body, scope: _Scopes,
                    what: str) -> requests.Response:
        auth = self._cached_auth(scope)
        resp = self._with_retries(method, url, {**headers, **auth}, body, what=what,
                                  auth_origin=self.base_url())
        if resp.status_code != 401:
            return resp
        challenges = parse_challenges(resp.headers.get("WWW-Authenticate"))
        resp.close()
        if auth:
            self._forget(scope)
        fresh = self._answer(challenges, scope, url, had_auth=bool(auth))
        resp = self._with_retries(method, url, {**headers, **fresh}, body, what=what,
                                  auth_origin=self.base_url())
        if resp.status_code == 401:
            again = parse_challenges(resp.headers.get("WWW-Authenticate"))
            resp.close()
            if again and again[0].error == "insufficient_scope":
                raise AuthError(f"{what}: access denied (the token lacks scope "
                                f"{again[0].params.get('scope') or ' '.join(scope.items)})",
                                url=url, status=401)
            raise AuthError(f"{what}: the registry refused the credentials"
                            + ("" if self.credentials() else " (none given: kiln login or "
                               "--creds)"), url=url, status=401)
        return resp

    def _cached_auth(self, scope: _Scopes) -> dict:
        ch = self._challenge
        if ch is None:
            return {}
        if ch.scheme == "basic":
            creds = self.credentials()
            return {"Authorization": basic_header(creds.username, creds.password)} if creds else {}
        if ch.scheme == "bearer":
            token = self._tokens.get(self._token_key(ch, scope))
            return {"Authorization": f"Bearer {token}"} if token else {}
        return {}

    def _forget(self, scope: _Scopes) -> None:
        if self._challenge is not None and self._challenge.scheme == "bearer":
            self._tokens.drop(self._token_key(self._challenge, scope))

    @staticmethod
    def _token_key(ch: Challenge, scope: _Scopes) -> tuple:
        return (ch.realm, ch.params.get("service"), scope.key)

    def _answer(self, challenges: list[Challenge], scope: _Scopes, url: str,
                had_auth: bool) -> dict:
        usable = [c for c in challenges if c.scheme in ("bearer", "basic")]
        if not usable:
            raise AuthError("the registry asks for authentication kiln does not speak: "
                            f"{challenges[0].scheme if challenges else 'no challenge given'}",
                            url=url, status=401)
        ch = next((c for c in usable if c.scheme == "bearer"), usable[0])
        if ch.scheme == "basic":
            creds = self.credentials()
            if creds is None:
                raise AuthError("authentication required (kiln login, or --creds USER:PASS)",
                                url=url, status=401)
            if not may_send_credentials(self.base_url(), url):
                raise AuthError("refusing to send credentials over plain http to another host",
                                url=url)
            self._challenge = ch
            return {"Authorization": basic_header(creds.username, creds.password)}
        if not ch.realm:
            raise AuthError("Bearer challenge without a realm", url=url, status=401)
        items = scope.items
        extra = ch.params.get("scope")
        if ch.error == "insufficient_scope" and extra and extra not in items:
            items = items + (extra,)
        elif not items and extra:
            items = (extra,)
        scope = _Scopes(items)
        self._challenge = ch
        token, expires_in = self._fetch_token(ch, scope)
        self._tokens.put(self._token_key(ch, scope), token, expires_in)
        return {"Authorization": f"Bearer {token}"}

    def _fetch_token(self, ch: Challenge, scope: _Scopes) -> tuple[str, float]:
        realm = urljoin(self.base_url() + "/", ch.realm)
        if urlsplit(realm).scheme not in ("http", "https"):
            raise AuthError(f"token realm {realm!r} is not an http(s) URL")
        params: list[tuple[str, str]] = []
        if ch.params.get("service"):
            params.append(("service", ch.params["service"]))
        params += [("scope", s) for s in scope.key]
        creds = self.credentials()
        send_creds = creds is not None and may_send_credentials(self.base_url(), realm)
        headers: dict[str, str] = {}
        if send_creds and creds.identity_token:
            form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                    "client_id": USER_AGENT, **dict(params[:1])}
            form["scope"] = " ".join(scope.key)
            resp = self._with_retries("POST", realm, {"Content-Type":
                                      "application/x-www-form-urlencoded"},
                                      urlencode(form).encode(), what="token request")
        else:
            if send_creds:
                headers["Authorization"] = basic_header(creds.username, creds.password)
            target = realm + ("&" if "?" in realm else "?") + urlencode(params)
            resp = self._with_retries("GET", target, headers, None, what="token request")
        with resp:
            if resp.status_code in (401, 403):
                raise AuthError("the token server refused the credentials"
                                + ("" if send_creds else " (none sent)"), url=realm,
                                status=resp.status_code)
            if resp.status_code != 200:
                raise self._status_error(resp, "token request failed")
            raw = read_body(resp, limit=1024 * 1024, deadline=time.monotonic()
                            + self.options.deadline_for(0), what="token response")
        import json

        try:
            doc = json.loads(raw)
        except ValueError:
            raise AuthError("the token server's answer is not JSON", url=realm) from None
        except RecursionError:
            raise AuthError("the token server's answer is JSON nested too deeply",
                            url=realm) from None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise AuthError("the token server's answer has no token", url=realm)
        expires = doc.get("expires_in")
        expires_in = float(expires) if isinstance(expires, int | float) and expires > 0 else 60.0
        return token, expires_in

    # -- the wire ------------------------------------------------------------
    def _with_retries(self, method: str, url: str, headers: Mapping[str, str], body: Body, *,
                      what: str, auth_origin: str | None = None) -> requests.Response:
        waited = 0.0
        attempt = 0
        while True:
            interrupt.check()
            try:
                resp = self._follow(method, url, headers, body, auth_origin)
            except requests.RequestException as e:
                interrupt.check()  # the stop shut the socket: no failure of the registry's
                failure = classify(e)
                if not failure.retry and failure.connect:
                    raise UnreachableError(_host_port(url), failure.reason, url=url,
                                           untrusted_certificate=failure.untrusted) from None
                delay = _backoff(attempt)
                if not failure.retry or attempt >= self.options.retries or (
                        waited + delay > self.options.retry_budget):
                    tries = f" (after {attempt + 1} attempts)" if attempt else ""
                    if failure.connect:
                        raise RegistryError(f"cannot connect to {_host_port(url)}: "
                                            f"{failure.reason}{tries}") from None
                    raise RegistryError(f"{what}: {failure.reason}{tries}", url=url) from None
            else:
                if resp.status_code not in RETRY_STATUSES:
                    return resp
                delay = _retry_after(resp.headers.get("Retry-After"))
                if delay is None:
                    delay = _backoff(attempt)
                if attempt >= self.options.retries or waited + delay > self.options.retry_budget:
                    return resp  # the caller reports the status
                resp.close()
            interrupt.wait(delay)
            waited += delay
            attempt += 1

    def _follow(self, method: str, url: str, headers: Mapping[str, str], body: Body,
                auth_origin: str | None) -> requests.Response:
        """One request and its redirects. Authorization goes only to ``auth_origin``'s
        scheme+host+port: never to another host, never after a downgrade to http."""
        hdrs = dict(headers)
        for _ in range(MAX_REDIRECTS + 1):
            if "Authorization" in hdrs and auth_origin is not None and not same_origin(
                    auth_origin, url):
                del hdrs["Authorization"]
            resp = self._session.request(
                method, url, headers=hdrs, data=_body(body), stream=True, allow_redirects=False,
                timeout=(self.options.connect_timeout, self.options.idle_timeout),
                verify=self.verify_tls)
            if resp.status_code not in REDIRECT_STATUSES or "Location" not in resp.headers:
                return resp
            target = urljoin(url, resp.headers["Location"])
            resp.close()
            if urlsplit(target).scheme not in ("http", "https"):
                raise RegistryError(f"redirect to a non-http URL {target!r}", url=url)
            if resp.status_code == 303 or (resp.status_code in (301, 302) and method == "POST"):
                method, body = "GET", None
            if auth_origin is None or not same_origin(auth_origin, target):
                hdrs.pop("Authorization", None)
            url = target
        raise RegistryError(f"more than {MAX_REDIRECTS} redirects", url=url)

    def _status_error(self, resp: requests.Response, what: str, *,
                      digest: str | None = None) -> RegistryError:
        detail = ""
        try:
            raw = read_body(resp, limit=MAX_ERROR_BODY, deadline=time.monotonic() + 5,
                            what="error body", truncate=True)
            detail = _registry_error_text(raw)
        except (RegistryError, requests.RequestException, OSError):
            pass
        cls = NotFoundOnRegistry if resp.status_code == 404 else (
            AuthError if resp.status_code in (401, 403) else RegistryError)
        msg = f"{what}: HTTP {resp.status_code}" + (f": {detail}" if detail else "")
        return cls(msg, url=resp.url or None, digest=digest, status=resp.status_code)

    def close(self) -> None:
        self._session.close()


def _body(body: Body):
    if callable(body):
        return body()
    return body


def _backoff(attempt: int) -> float:
    return min(10.0, 0.2 * (2 ** attempt)) * (0.75 + random.random() / 2)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class Failure:
    """What went wrong on the wire, in a few words, and whether asking again may help."""

    reason: str
    retry: bool         # timeouts, resets, a dropped connection: they can heal
    connect: bool       # no connection was made (the message names host:port, not the URL)
    untrusted: bool = False


def classify(e: BaseException) -> Failure:
    """Refused, no such host, TLS failures: final. Timeouts, resets: worth another try.
    The reason is a few words, never urllib3's pool and retry dump."""
    chain = _causes(e)
    for x in chain:
        if isinstance(x, ssl.SSLCertVerificationError):
            detail = x.verify_message or x.reason or "not trusted"
            return Failure(f"TLS certificate verification failed: {detail}", False, True, True)
    if any("CERTIFICATE_VERIFY_FAILED" in str(x) for x in chain):
        return Failure("TLS certificate verification failed", False, True, True)
    if isinstance(e, requests.exceptions.SSLError):
        detail = next((x.reason for x in chain if isinstance(x, ssl.SSLError) and x.reason),
                      None) or "handshake failed"
        return Failure(f"TLS handshake failed: {str(detail).lower().replace('_', ' ')}", False,
                       True)
    for x in chain:
        if isinstance(x, socket.gaierror):
            return Failure(f"DNS lookup failed: {x.strerror or x}", False, True)
        if isinstance(x, ConnectionRefusedError):
            return Failure("connection refused", False, True)
    if isinstance(e, requests.exceptions.ConnectTimeout):
        return Failure("connection timed out", True, True)
    if isinstance(e, requests.Timeout) or any(isinstance(x, TimeoutError) for x in chain):
        return Failure("timed out", True, False)
    new_connection = any(type(x).__name__ == "NewConnectionError" for x in chain)
    for x in chain:
        if isinstance(x, ConnectionResetError):
            return Failure("connection reset by the server", True, new_connection)
        if type(x).__name__ in ("RemoteDisconnected", "IncompleteRead"):
            return Failure("the server closed the connection", True, new_connection)
        if isinstance(x, OSError) and x.strerror:  # unreachable network, ... : may heal
            return Failure(x.strerror[:1].lower() + x.strerror[1:], True, new_connection)
    return Failure(f"connection failed ({type(e).__name__})", True, new_connection)


def _causes(e: BaseException) -> list[BaseException]:
    """``e`` and everything behind it: __cause__, __context__, urllib3's ``reason``, and
    exceptions passed as arguments (requests wraps urllib3's that way)."""
    out: list[BaseException] = []
    todo = [e]
    while todo and len(out) < 32:
        x = todo.pop(0)
        if any(x is seen for seen in out):
            continue
        out.append(x)
        behind = [x.__cause__, x.__context__, getattr(x, "reason", None), *x.args]
        todo += [b for b in behind if isinstance(b, BaseException)]
    return out


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or parts.netloc
    host = f"[{host}]" if ":" in host else host
    try:
        port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
    except ValueError:
        port = None
    return f"{host}:{port}" if port else host


def _registry_error_text(raw: bytes) -> str:
    """The ``errors`` of a distribution error body, else its start: one printable line."""
    import json

    try:
        doc = json.loads(raw)
        errors = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errors, list) and errors:
            parts = []
            for err in errors[:3]:
                if isinstance(err, dict):
                    code, msg = err.get("code"), err.get("message")
                    parts.append(" ".join(str(p) for p in (code, msg) if p))
            return _one_line("; ".join(p for p in parts if p), 500)
    except ValueError:
        pass
    except RecursionError:
        return "(error body not shown: JSON nested too deeply)"
    return _one_line(raw.decode("utf-8", "replace"), 200)


def _one_line(text: str, limit: int) -> str:
    """A server's words, made safe to print: no newlines, no terminal escapes, bounded."""
    text = "".join(c if c.isprintable() else " " for c in text[: limit * 4])
    return " ".join(text.split())[:limit]


def read_body(resp: requests.Response, *, limit: int, deadline: float, what: str,
              truncate: bool = False) -> bytes:
    """The whole body, refusing more than ``limit`` bytes (or cutting, with ``truncate``)
    and giving up at ``deadline`` (time.monotonic())."""
    chunks: list[bytes] = []
    total = 0
    while True:
        interrupt.check()
        if time.monotonic() > deadline:
            raise RegistryError(f"{what}: timed out while reading the body", url=resp.url)
        try:
            chunk = resp.raw.read1(min(65536, limit + 1 - total), decode_content=True)
        except Exception as e:  # urllib3 ProtocolError, ReadTimeoutError, ...
            raise RegistryError(f"{what}: {classify(e).reason} while reading the body",
                                url=resp.url) from None
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            if truncate:
                chunks.append(chunk[: len(chunk) - (total - limit)])
                break
            raise RegistryError(f"{what} is larger than {limit} bytes", url=resp.url)
        chunks.append(chunk)
    return b"".join(chunks)
