"""The cosign fixture table through the code path `kiln verify --key` takes
(registry_client.trust: requirements_for + check), not just the signing primitives."""

from __future__ import annotations

import pytest

from registry_client.trust import VerificationError, check, requirements_for
from store.digest import sha256_digest
from store.signatures import StoredSignature
from store.signing import read_containers_signature
from tests.store.test_signing import ACCEPTED, FIXTURES, REJECTED, fixture_bytes

pytestmark = pytest.mark.usefixtures("corpus")


@pytest.fixture(scope="module")
def corpus():
    if not FIXTURES.is_dir():
        pytest.skip(f"!!! COSIGN FIXTURES MISSING: {FIXTURES} does not exist, so kiln verify "
                    "is NOT tested against real cosign/skopeo signatures !!!")


def kiln_verify(name: str, reference: str, keys=("cosign.pub",)) -> list[str]:
    path = FIXTURES / name
    if path.is_dir():
        manifest = fixture_bytes(path / "manifest.json")
        files = sorted(path.glob("signature-*"))
    else:
        manifest = fixture_bytes(FIXTURES / "dir-img-cosign-valid" / "manifest.json")
        files = [path]
    if manifest is None:
        raise VerificationError(f"{name}: no manifest to verify against")
    stored = []
    for f in files:
        sig = read_containers_signature(fixture_bytes(f), where=f.name)
        stored.append(StoredSignature(sig.payload, sig.signature, dict(sig.annotations),
                                      sig.media_type))
    digest = sha256_digest(manifest)
    reqs = requirements_for(reference, verify_keys=[str(FIXTURES / k) for k in keys])
    return check(reqs, reference, [digest], lambda d: stored if d == digest else [])


@pytest.mark.parametrize("name,reference,signed_ref,optional", ACCEPTED,
                         ids=[r[0] for r in ACCEPTED])
def test_accepted(name, reference, signed_ref, optional):
    (line,) = kiln_verify(name, reference)
    assert signed_ref in line


@pytest.mark.parametrize("name,reference,reason", REJECTED,
                         ids=[f"{r[0]}:{r[1]}" for r in REJECTED])
def test_rejected(name, reference, reason):
    with pytest.raises(VerificationError, match=reason):
        kiln_verify(name, reference)


def test_keys():
    sample = ACCEPTED[0][1]
    with pytest.raises(VerificationError, match="does not verify with the public key"):
        kiln_verify("dir-img-cosign-valid", sample, keys=("cosign2.pub",))
    kiln_verify("dir-img-cosign-valid", sample, keys=("cosign2.pub", "cosign.pub"))
