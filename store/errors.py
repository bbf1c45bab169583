"""kiln's exception hierarchy.

Every failure kiln itself detects is a KilnError; the CLI prints it as
``kiln: error: <message>`` and exits 125. Packages subclass it so a library
caller can catch one concern.
"""


class KilnError(Exception):
    """Root of every error kiln raises on purpose."""


class StoreError(KilnError):
    """The store cannot do what was asked (missing image, bad layout, lock trouble)."""


class DigestError(StoreError):
    """A digest string is malformed, or bytes do not match the digest they claim."""


class LayerError(StoreError):
    """A layer tarball is hostile or broken; names the layer and the entry."""

    def __init__(self, message: str, *, layer: str | None = None, entry: str | None = None):
        parts = []
        if layer:
            parts.append(f"layer {layer}")
        if entry is not None:
            parts.append(f"entry {entry!r}")
        where = (" (" + ", ".join(parts) + ")") if parts else ""
        super().__init__(message + where)
        self.layer = layer
        self.entry = entry


class ReferenceError_(KilnError):
    """An image reference cannot be parsed."""


class ManifestError(StoreError):
    """A manifest, index or config document is invalid."""


class NotFoundError(StoreError):
    """An image, blob or layer is not in the store."""
