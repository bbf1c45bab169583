"""Errors of the registry client: each names the URL (and the digest) it is about."""

from __future__ import annotations

from store.errors import KilnError


class RegistryError(KilnError):
    """A registry answered wrongly, refused us, or could not be reached."""

    def __init__(self, message: str, *, url: str | None = None, digest: str | None = None,
                 status: int | None = None):
        parts = []
        if digest:
            parts.append(digest)
        if url:
            parts.append(url)
        super().__init__(message + (f" ({', '.join(parts)})" if parts else ""))
        self.url = url
        self.digest = digest
        self.status = status


class AuthError(RegistryError):
    """Credentials were refused, or the registry keeps asking for them."""


class NotFoundOnRegistry(RegistryError):
    """The manifest, tag or blob does not exist on the registry."""


class UnreachableError(RegistryError):
    """No connection could be made and asking again will not change that: refused, no
    such host, TLS not trusted. One line, ``cannot connect to HOST:PORT: reason``."""

    def __init__(self, host: str, reason: str, *, url: str | None = None,
                 untrusted_certificate: bool = False):
        KilnError.__init__(self, f"cannot connect to {host}: {reason}")
        self.url, self.digest, self.status = url, None, None
        self.host, self.reason = host, reason
        self.untrusted_certificate = untrusted_certificate
