"""Image references, parsed and normalised one way everywhere.

``busybox`` is ``docker.io/library/busybox:latest``; ``localhost:5000/x`` keeps
its registry; ``name@sha256:...`` pins a digest. The grammar is the one of
distribution/reference, which docker, podman and buildah share.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from store.digest import validate_digest
from store.errors import DigestError, ReferenceError_

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
DOCKER_HUB_ENDPOINT = "index.docker.io"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_MAX_NAME = 255


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """Fully qualified repository, e.g. ``docker.io/library/busybox``."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        s = self.name
        if self.tag is not None:
            s += ":" + self.tag
        if self.digest is not None:
            s += "@" + self.digest
        return s

    @property
    def endpoint(self) -> str:
        """The host to talk to: Docker Hub's API lives on index.docker.io."""
        return DOCKER_HUB_ENDPOINT if self.registry == DEFAULT_REGISTRY else self.registry

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.registry, self.repository, tag, None)


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        return first, rest
    return DEFAULT_REGISTRY, name


def parse_reference(text: str, *, default_tag: bool = True) -> Reference:
    """Parse and normalise an image reference; raise ReferenceError_ when it is invalid."""
    if not isinstance(text, str) or not text:
        raise ReferenceError_("invalid image reference '': empty")
    if text != text.strip() or any(c.isspace() for c in text):
        raise ReferenceError_(f"invalid image reference {text!r}: contains whitespace")
    remainder, at, digest = text.partition("@")
    if at:
        try:
            validate_digest(digest)
        except DigestError as e:
            raise ReferenceError_(f"invalid image reference {text!r}: {e}") from None
    else:
        digest = None
    tag = None
    slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise ReferenceError_(f"invalid image reference {text!r}: bad tag {tag!r}")
    registry, path = _split_domain(remainder)
    if not _DOMAIN.fullmatch(registry):
        raise ReferenceError_(f"invalid image reference {text!r}: bad registry {registry!r}")
    if registry == DOCKER_HUB_ENDPOINT:
        registry = DEFAULT_REGISTRY
    if any(c.isupper() for c in path):
        raise ReferenceError_(
            f"invalid image reference {text!r}: repository name must be lowercase"
        )
    if not _PATH.fullmatch(path):
        raise ReferenceError_(f"invalid image reference {text!r}: bad repository name {path!r}")
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = "library/" + path
    if len(registry) + 1 + len(path) > _MAX_NAME:
        raise ReferenceError_(f"invalid image reference {text!r}: name longer than 255 characters")
    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return Reference(registry, path, tag, digest)
