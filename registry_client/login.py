"""``kiln login``: check credentials against a registry before they are stored."""

from __future__ import annotations

from registry_client.transport import RegistryOptions, RegistryTransport
from store.errors import KilnError


def registry_host(text: str) -> str:
    """``https://quay.io/`` or ``quay.io/team`` -> what auth.json is keyed by."""
    host = text.strip()
    for prefix in ("https://", "http://", "docker://"):
        host = host.removeprefix(prefix)
    host = host.rstrip("/")
    if not host or " " in host:
        raise KilnError(f"invalid registry {text!r}")
    first = host.split("/", 1)[0]
    if first in ("index.docker.io", "registry-1.docker.io"):
        host = "docker.io" + host[len(first):]
    return host


def check_login(registry: str, creds, options: RegistryOptions | None = None) -> None:
    """GET /v2/ with ``creds``; raises AuthError when the registry refuses them."""
    transport = RegistryTransport(registry.split("/", 1)[0], options or RegistryOptions())
    try:
        transport.set_credentials(creds)
        transport.request("GET", "/v2/", what="login").close()
    finally:
        transport.close()
