"""cosign signatures on a registry: the ``sha256-<hex>.sig`` manifest of a repository."""

from __future__ import annotations

import io
import time

from registry_client.errors import NotFoundOnRegistry
from registry_client.remote import RemoteRepository
from registry_client.transport import read_body
from store.documents import MAX_DOCUMENT_BYTES, OCI_MANIFEST, Descriptor
from store.signatures import (
    StoredSignature,
    build_signature_manifest,
    parse_signature_manifest,
    signature_tag,
)


def fetch_signature_manifest(repo: RemoteRepository, manifest_digest: str) -> bytes | None:
    tag = signature_tag(manifest_digest)
    try:
        resp = repo.transport.request(
            "GET", f"/v2/{repo.repository}/manifests/{tag}", scopes=repo.scopes(),
            headers={"Accept": OCI_MANIFEST}, what="signature fetch")
    except NotFoundOnRegistry:
        return None
    with resp:
        return read_body(resp, limit=MAX_DOCUMENT_BYTES, what=f"signature manifest {tag}",
                         deadline=time.monotonic() + repo.options.deadline_for(
                             MAX_DOCUMENT_BYTES))


def fetch_signatures(repo: RemoteRepository, manifest_digest: str) -> list[StoredSignature]:
    raw = fetch_signature_manifest(repo, manifest_digest)
    if raw is None:
        return []
    where = f"{repo.transport.registry}/{repo.repository}:{signature_tag(manifest_digest)}"
    return parse_signature_manifest(raw, repo.read_blob, where=where)


def push_signatures(repo: RemoteRepository, manifest_digest: str,
                    new: list[StoredSignature]) -> str:
    """Append ``new`` to the repository's signatures of the digest; returns the new
    signature manifest's digest."""
    existing = fetch_signatures(repo, manifest_digest)
    manifest, config, payloads = build_signature_manifest(existing + new)
    from store.digest import sha256_digest

    for blob in (config, *payloads):
        digest = sha256_digest(blob)
        if not repo.blob_exists(digest, push=True):
            repo.upload_blob(io.BytesIO(blob), Descriptor("application/octet-stream", digest,
                                                          len(blob)))
    return repo.put_manifest(manifest, OCI_MANIFEST, signature_tag(manifest_digest))
