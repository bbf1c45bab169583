"""Registry auth: WWW-Authenticate challenges and the Bearer token flow.

Tokens are cached per (realm, service, scopes) until shortly before they
expire. Whether credentials may go to a token realm is decided here, once:
only to the registry's own host, or to a realm the registry named over TLS
that is itself https.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_PARAM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*,?')


@dataclass(frozen=True)
class Challenge:
    scheme: str            # "bearer" or "basic" (lower case)
    params: dict = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def error(self) -> str | None:
        return self.params.get("error")


def parse_challenges(header: str | None) -> list[Challenge]:
    """Parse a WWW-Authenticate header (one or more challenges)."""
    if not header:
        return []
    out: list[Challenge] = []
    rest = header.strip()
    while rest:
        m = re.match(r"([A-Za-z][A-Za-z0-9_-]*)\s*", rest)
        if not m:
            break
        scheme = m.group(1).lower()
        rest = rest[m.end():]
        params: dict[str, str] = {}
        while True:
            pm = _PARAM.match(rest)
            if not pm:
                break
            value = pm.group(2) if pm.group(2) is not None else pm.group(3)
            params[pm.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
            rest = rest[pm.end():]
        out.append(Challenge(scheme, params))
        rest = rest.lstrip(", ")
    return out


def basic_header(username: str, password: str) -> str:
    raw = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def same_origin(a: str, b: str) -> bool:
    """Same scheme, host and port."""
    sa, sb = urlsplit(a), urlsplit(b)
    return (sa.scheme, sa.hostname, _port(sa)) == (sb.scheme, sb.hostname, _port(sb))


def same_host(a: str, b: str) -> bool:
    sa, sb = urlsplit(a), urlsplit(b)
    return (sa.hostname, _port(sa)) == (sb.hostname, _port(sb))


def _port(parts) -> int | None:
    if parts.port is not None:
        return parts.port
    return {"https": 443, "http": 80}.get(parts.scheme)


def may_send_credentials(registry_url: str, target_url: str) -> bool:
    """Credentials of the registry at ``registry_url`` may go to ``target_url``: the same
    host name without an https->http downgrade, or an https target the registry named
    over TLS."""
    reg, tgt = urlsplit(registry_url), urlsplit(target_url)
    if reg.scheme == "https" and tgt.scheme != "https":
        return False
    if reg.hostname == tgt.hostname:  # e.g. a token service on another port of the host
        return True
    return reg.scheme == "https" and tgt.scheme == "https"


@dataclass
class Token:
    value: str
    expires_at: float


class TokenCache:
    """Bearer tokens per (realm, service, scopes); thread-safe."""

    def __init__(self) -> None:
        self._tokens: dict[tuple, Token] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple) -> str | None:
        with self._lock:
            token = self._tokens.get(key)
            if token is None or token.expires_at <= time.monotonic():
                self._tokens.pop(key, None)
                return None
            return token.value

    def put(self, key: tuple, value: str, expires_in: float) -> None:
        # Refresh a little early so a token does not expire in flight.
        lifetime = max(1.0, expires_in - min(30.0, expires_in / 5))
        with self._lock:
            self._tokens[key] = Token(value, time.monotonic() + lifetime)

    def drop(self, key: tuple) -> None:
        with self._lock:
            self._tokens.pop(key, None)
