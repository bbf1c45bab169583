"""Signatures at rest, the way cosign keeps them.

For an image whose manifest digest is ``sha256:<hex>``, its signatures are one
OCI image manifest tagged ``sha256-<hex>.sig`` in the same repository: a config
listing the layer digests as diff_ids, and one layer per signature whose blob is
the simple-signing payload and whose annotation carries the base64 signature.
In kiln's store that manifest is a tag like any other (``<repo>:sha256-<hex>.sig``),
so it is a GC root, and ``save``/``load``/``push``/``pull`` carry it with the image.
Nothing read here is trusted: the verifier checks every signature it returns.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from store.digest import digest_hex, sha256_digest, validate_digest
from store.documents import (
    MAX_DOCUMENT_BYTES,
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    canonical_json,
    decode_document,
)
from store.errors import DigestError, ManifestError, NotFoundError

SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
MAX_SIGNATURES = 256
MAX_PAYLOAD = 64 * 1024
_SIG_TAG = re.compile(r"sha256-([0-9a-f]{64})\.sig")


@dataclass(frozen=True)
class StoredSignature:
    payload: bytes
    signature: str          # base64, as found (checked by the verifier, not here)
    annotations: dict
    media_type: str = SIMPLESIGNING


def signature_tag(manifest_digest: str) -> str:
    return "sha256-" + digest_hex(validate_digest(manifest_digest)) + ".sig"


def signed_digest(tag: str) -> str | None:
    """``sha256-<hex>.sig`` -> ``sha256:<hex>`` (None for any other tag)."""
    m = _SIG_TAG.fullmatch(tag)
    return f"sha256:{m.group(1)}" if m else None


def is_signature_name(name: str) -> bool:
    return signed_digest(name.rpartition(":")[2]) is not None


def parse_signature_manifest(raw: bytes, read_blob: Callable[[str, int], bytes], *,
                             where: str) -> list[StoredSignature]:
    """The simple-signing layers of a ``.sig`` manifest (other attachments are skipped)."""
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise ManifestError(f"{where}: signature manifest is larger than {MAX_DOCUMENT_BYTES} "
                            "bytes")
    doc = decode_document(raw, what=f"{where} signature manifest")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ManifestError(f"{where}: signature manifest has no layers list")
    if len(layers) > MAX_SIGNATURES:
        raise ManifestError(f"{where}: signature manifest lists {len(layers)} layers (at most "
                            f"{MAX_SIGNATURES})")
    out: list[StoredSignature] = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or layer.get("mediaType") != SIMPLESIGNING:
            continue
        desc = Descriptor.from_json(layer, where=f"{where} layers[{i}]")
        if desc.size > MAX_PAYLOAD:
            raise ManifestError(f"{where}: layers[{i}]: signature payload of {desc.size} bytes "
                                f"(at most {MAX_PAYLOAD})")
        annotations = desc.annotations or {}
        payload = read_blob(desc.digest, desc.size)
        if sha256_digest(payload) != desc.digest:
            raise DigestError(f"{where}: signature payload {desc.digest} does not match its "
                              "content")
        out.append(StoredSignature(payload, annotations.get(SIGNATURE_ANNOTATION, ""),
                                   dict(annotations)))
    return out


def build_signature_manifest(signatures: list[StoredSignature]
                             ) -> tuple[bytes, bytes, list[bytes]]:
    """(manifest, config, payload blobs) for these signatures, in cosign's layout."""
    layers = []
    payloads = []
    seen = set()
    for sig in signatures:
        key = (sha256_digest(sig.payload), sig.signature)
        if key in seen:
            continue
        seen.add(key)
        annotations = {k: v for k, v in sig.annotations.items() if isinstance(v, str)}
        annotations[SIGNATURE_ANNOTATION] = sig.signature
        layers.append({"mediaType": SIMPLESIGNING, "size": len(sig.payload),
                       "digest": key[0], "annotations": annotations})
        payloads.append(sig.payload)
    config = canonical_json({
        "architecture": "", "os": "", "config": {},
        "created": "0001-01-01T00:00:00Z",
        "history": [{"created": "0001-01-01T00:00:00Z"}],
        "rootfs": {"type": "layers", "diff_ids": [la["digest"] for la in layers]},
    })
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "size": len(config),
                   "digest": sha256_digest(config)},
        "layers": layers,
    }, separators=(",", ":")).encode()
    return manifest, config, payloads


class LocalSignatures:
    """Signatures kept in the store beside the images they sign."""

    def __init__(self, store):
        self.store = store

    def entries_for(self, manifest_digest: str) -> list[tuple[str, Descriptor]]:
        tag = signature_tag(manifest_digest)
        return [(t.name, t.descriptor) for t in self.store.tags()
                if t.name.rpartition(":")[2] == tag]

    def load(self, manifest_digest: str) -> list[StoredSignature]:
        out: list[StoredSignature] = []
        for name, desc in self.entries_for(manifest_digest):
            raw = self.store.read_blob(desc.digest, desc.size)
            out += parse_signature_manifest(raw, self.store.read_blob, where=name)
        return out

    def add(self, repository: str, manifest_digest: str, new: list[StoredSignature]
            ) -> Descriptor:
        """Append ``new`` to the signatures of ``repository`` (``host/path``) for the digest."""
        name = f"{repository}:{signature_tag(manifest_digest)}"
        existing: list[StoredSignature] = []
        with self.store.writing():  # no prune between reading what is kept and adding to it
            try:
                desc = self.store.resolve(name)
                existing = parse_signature_manifest(
                    self.store.read_blob(desc.digest, desc.size), self.store.read_blob,
                    where=name)
            except NotFoundError:
                pass
            manifest, config, payloads = build_signature_manifest(existing + new)
            for blob in (config, *payloads):
                self.store.put_bytes(blob, "application/octet-stream")
            desc = self.store.put_bytes(manifest, OCI_MANIFEST)
            desc = Descriptor(OCI_MANIFEST, desc.digest, desc.size)
            self.store.tag(name, desc)
        return desc


def copy_signature_manifest(raw: bytes, read_blob: Callable[[str, int], bytes], put_bytes,
                            *, where: str) -> Descriptor:
    """Copy a ``.sig`` manifest and its blobs with ``put_bytes(data, media_type)``; the
    payloads are checked on the way (parse_signature_manifest) and each blob read once."""
    blobs: dict[str, bytes] = {}

    def read_once(digest: str, size: int) -> bytes:
        if digest not in blobs:
            blobs[digest] = read_blob(digest, size)
        return blobs[digest]

    doc = decode_document(raw, what=f"{where} signature manifest")
    parse_signature_manifest(raw, read_once, where=where)
    config = Descriptor.from_json(doc["config"], where=f"{where} config")
    if config.size > MAX_PAYLOAD:
        raise ManifestError(f"{where}: signature config of {config.size} bytes")
    put_bytes(read_once(config.digest, config.size), config.media_type)
    for i, layer in enumerate(doc["layers"]):
        desc = Descriptor.from_json(layer, where=f"{where} layers[{i}]")
        if desc.size > MAX_PAYLOAD:
            raise ManifestError(f"{where}: layers[{i}] of {desc.size} bytes")
        put_bytes(read_once(desc.digest, desc.size), desc.media_type)
    return put_bytes(raw, OCI_MANIFEST)
