"""Which signatures an image needs, and checking that it has them.

The requirements come from ``--verify-key PUB`` (a sigstoreSigned requirement with
containers/image's default identity rule) and/or a containers policy.json. An image
is checked by its manifest digest and, for a multi-platform image, by its index
digest too: either may carry the signature. Every check runs before any layer is
fetched or unpacked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from store.errors import KilnError
from store.signatures import StoredSignature


class VerificationError(KilnError):
    """The image does not carry the signatures its policy asks for."""


def requirements_for(reference: str, *, verify_keys: Sequence[str] = (),
                     policy_path: str | None = None) -> list | None:
    """The requirements for ``reference``; None when the user asked for no check."""
    from store.policy import SigstoreSigned, load_policy

    reqs: list = []
    if verify_keys:
        pems = []
        for path in verify_keys:
            try:
                pems.append(Path(path).read_bytes())
            except OSError as e:
                raise VerificationError(f"cannot read the public key {path}: {e.strerror}"
                                        ) from None
        reqs.append(SigstoreSigned(keys=tuple(pems), identity=_RepoOrExact()))
    if policy_path:
        reqs += load_policy(policy_path).requirements_for(reference)
    return reqs or None


class _RepoOrExact:
    """--verify-key's identity rule: a signature naming only a repository (as cosign and
    kiln sign) holds for any tag or digest of it; one naming a tag, for that tag only."""

    def matches(self, payload_reference: str, image_reference: str) -> bool:
        from store.signing import match_repo_or_exact

        return match_repo_or_exact(payload_reference, image_reference)


def check(requirements: list, reference: str, digests: Sequence[str],
          signatures_for: Callable[[str], list[StoredSignature]]) -> list[str]:
    """Every requirement must hold for the image named ``reference`` whose manifest (and
    index) digests are ``digests``; returns what held, one line each."""
    from store.policy import AcceptAnything, Reject, SigstoreSigned

    held: list[str] = []
    cache: dict[str, list[StoredSignature]] = {}
    for req in requirements:
        if isinstance(req, AcceptAnything):
            held.append("policy: insecureAcceptAnything")
        elif isinstance(req, Reject):
            raise VerificationError(f"{reference}: the signature policy rejects this image")
        elif isinstance(req, SigstoreSigned):
            held.append(_check_sigstore(req, reference, digests, signatures_for, cache))
        else:  # pragma: no cover - the policy parser admits nothing else
            raise VerificationError(f"{reference}: unsupported requirement {req!r}")
    return held


def _check_sigstore(req, reference: str, digests: Sequence[str], signatures_for,
                    cache: dict) -> str:
    from store.signing import ImageIdentity, Signature, SigningError, load_public_key, verify_any

    def rule(payload_reference: str, image_reference: str) -> bool:
        return req.identity.matches(payload_reference, image_reference)

    rule.__name__ = getattr(req.identity, "type", "repository or exact reference")

    keys = [load_public_key(pem, where=f"public key #{i + 1}") for i, pem in
            enumerate(req.keys)]
    reasons: list[str] = []
    for digest in dict.fromkeys(digests):
        if digest not in cache:
            cache[digest] = signatures_for(digest)
        sigs = [_as_signature(Signature, s) for s in cache[digest]]
        try:
            payload = verify_any(sigs, keys, manifest_digest=digest,
                                 identity=ImageIdentity(reference, rule))
        except SigningError as e:
            reasons.append(f"{digest}: {e}")
            continue
        return f"signed: {payload.docker_reference} @ {digest}"
    raise VerificationError(f"{reference}: no valid signature: " + "; ".join(reasons))


def check_stored(store, reference: str, desc, requirements: list,
                 image=None) -> list[str]:
    """``check`` for the image at ``desc`` in ``store``, against the signatures the store
    keeps for it (``image``: that image, when the caller has it already)."""
    from store.signatures import LocalSignatures

    image = image if image is not None else store.image_for(desc)
    return check(requirements, reference, [desc.digest, image.digest],
                 LocalSignatures(store).load)


def verify_local(store, name: str, requirements: list) -> list[str]:
    """``kiln verify NAME``: the signatures in the store, and every blob re-hashed."""
    from store.errors import NotFoundError
    from store.reference import parse_reference

    desc = store.resolve(name)
    image = store.image_for(desc)
    try:
        reference = str(parse_reference(name))
    except KilnError:
        names = store.names_of(desc.digest)
        reference = names[0] if names else name
    image.config()  # read_blob checks the config's digest
    layers = image.layers()
    for layer in layers:
        try:
            with store.open_blob(layer.digest, layer.size) as blob:
                blob.read_all_and_verify()
        except NotFoundError:
            raise VerificationError(f"{reference}: layer {layer.digest} named by the manifest "
                                    "is missing from the store") from None
        except KilnError as e:
            raise VerificationError(f"{reference}: layer {layer.digest}: {e}") from None
    held = check_stored(store, reference, desc, requirements, image)
    return held + [f"blobs: config and {len(layers)} layers present with their digests"]


def verify_remote(reference: str, requirements: list | None, options) -> list[str]:
    """``kiln verify docker://REF``: signatures on the registry; every blob present there."""
    from registry_client.pull import open_remote_image
    from registry_client.signatures import fetch_signatures

    remote = open_remote_image(reference, options)
    try:
        name = str(remote.reference)
        held = check(requirements or [], name,
                     [remote.top.descriptor.digest, remote.manifest.descriptor.digest],
                     lambda d: fetch_signatures(remote.repository, d))
        layers = remote.image.layers()  # the config was fetched and checked by digest
        for layer in layers:
            if not remote.repository.blob_exists(layer.digest):
                raise VerificationError(f"{name}: layer {layer.digest} named by the manifest "
                                        "is missing on the registry")
        return held + [f"blobs: config and {len(layers)} layers present"]
    finally:
        remote.close()


def _as_signature(cls, stored: StoredSignature):
    return cls(stored.payload, stored.signature, stored.annotations, stored.media_type)
