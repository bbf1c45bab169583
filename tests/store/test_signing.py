"""cosign-compatible signing: keys, payload, sign/verify, against signatures no one here made.

Third-party inputs: the cosign/skopeo signatures of containers/image's fixtures (read in
place from ../shared/corpora/cosign-fixtures), cosign-made encrypted key files and
go-securesystemslib's envelope test vectors (transcribed below, sources named), and
openssl as an independent ECDSA implementation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import time
from pathlib import Path

import nacl.secret
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from store.digest import sha256_digest
from store.signing import (
    COSIGN_TYPE,
    SIGNATURE_ANNOTATION,
    SIMPLESIGNING_MEDIA_TYPE,
    ImageIdentity,
    KeyError_,
    Signature,
    SigningError,
    containers_signature_bytes,
    create_signature,
    decrypt_secret,
    encrypt_private_key,
    generate_key_pair,
    load_private_key,
    load_public_key,
    make_payload,
    match_exact,
    match_repo_digest_or_exact,
    match_repo_or_exact,
    match_repository,
    parse_payload,
    read_containers_signature,
    sign_payload,
    verify_any,
    verify_signature,
)
from tests.conftest import CORPORA

FIXTURES = CORPORA / "cosign-fixtures"
PASSWORD = b"correct horse battery staple"
SAMPLE = "192.168.64.2:5000/cosign-signed-single-sample"
SIGNED_DIGEST = "sha256:634a8f35b5f16dcf4aaa0822adc0b1964bb786fca12f6831de8ddc45e5986a00"
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
REPO = "registry.example.com/team/app"


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"!!! COSIGN FIXTURES MISSING: {FIXTURES} does not exist, so kiln is NOT "
                    "tested against real cosign/skopeo signatures !!!")
    return FIXTURES


@pytest.fixture(scope="module")
def key_pair():
    private_pem, public_pem = generate_key_pair(PASSWORD)
    return private_pem, public_pem, load_private_key(private_pem, PASSWORD)


@pytest.fixture(scope="module")
def key(key_pair):
    return key_pair[2]


@pytest.fixture(scope="module")
def pub(key_pair):
    return load_public_key(key_pair[1])


_FLATTENED_LINK = re.compile(rb"\.\./[\w.-]+(?:/[\w.-]+)*")


def fixture_bytes(path: Path) -> bytes | None:
    """A fixture file's bytes, None when absent.

    Upstream's symlinks (dir-img-cosign-valid-2/signature-1 -> ../dir-img-cosign-valid/...)
    arrive in the corpus flattened into regular files holding the link text; follow those
    within the corpus. A link whose target is not in the corpus counts as absent.
    """
    root = FIXTURES.resolve()
    for _ in range(5):
        if not path.is_file():
            return None
        data = path.read_bytes()
        if not _FLATTENED_LINK.fullmatch(data):
            return data
        path = (path.parent / data.decode()).resolve()
        assert root in path.parents, f"fixture link leaves the corpus: {path}"
    raise AssertionError(f"fixture link loop at {path}")


def fixture_keys(*names: str) -> list:
    return [load_public_key((FIXTURES / n).read_bytes(), where=n) for n in names]


def verify_fixture(name: str, reference: str, keys=("cosign.pub",), rule=match_repo_or_exact):
    """What `kiln verify` does with a dir image: hash the manifest, read every signature,
    verify_any with the identity rule for ``reference``."""
    path = FIXTURES / name
    if path.is_dir():
        manifest = fixture_bytes(path / "manifest.json")
        sig_files = sorted(path.glob("signature-*"))
    else:  # a lone signature file: judge it against the manifest it was made for
        manifest = fixture_bytes(FIXTURES / "dir-img-cosign-valid" / "manifest.json")
        sig_files = [path]
    if manifest is None:
        raise SigningError(f"{name}: no manifest to verify against")
    sigs = [read_containers_signature(fixture_bytes(p), where=p.name) for p in sig_files]
    return verify_any(sigs, fixture_keys(*keys), manifest_digest=sha256_digest(manifest),
                      identity=ImageIdentity(reference, rule))


# --- every row of FORMAT.md's outcome table ---------------------------------------------

ACCEPTED = [
    ("dir-img-cosign-valid", SAMPLE, SAMPLE, None),
    ("dir-img-cosign-valid-2", SAMPLE, SAMPLE, None),
    ("dir-img-cosign-mixed", SAMPLE, SAMPLE, None),
    ("dir-img-cosign-valid-with-tag", "192.168.64.2:5000/skopeo-signed:tag",
     "192.168.64.2:5000/skopeo-signed:tag",
     {"creator": "containers/image 5.21.2-dev", "timestamp": 1657296609}),
]

REJECTED = [
    ("dir-img-cosign-valid", "testing/manifest:notlatest",
     r"identity '192\.168\.64\.2:5000/cosign-signed-single-sample' is not accepted for image "
     r"testing/manifest:notlatest"),
    ("dir-img-cosign-valid-2", "this/does-not:match", r"signature 1: .*is not accepted"
     r".*signature 2: .*is not accepted"),
    ("dir-img-cosign-valid-with-tag", "192.168.64.2:5000/skopeo-signed:othertag",
     r"identity '192\.168\.64\.2:5000/skopeo-signed:tag' is not accepted"),
    ("dir-img-cosign-modified-manifest", SAMPLE,
     rf"signature is for {SIGNED_DIGEST} not sha256:d9dcafdb480aa7c4"),
    # Upstream: computing the manifest's digest fails (a schema1 manifest with bad
    # signatures). The corpus ships that manifest as a link to a file it lacks.
    ("dir-img-cosign-manifest-digest-error", SAMPLE, r"no manifest|signature is for"),
    ("dir-img-cosign-no-manifest", SAMPLE, r"no manifest to verify against"),
    ("dir-img-cosign-other-attachment", "testing/manifest:latest",
     r"not a simple-signing signature \(media type 'text/plain'\)"),
    ("unknown-cosign-key.signature", SAMPLE, r"does not verify with the public key"),
]


@pytest.mark.parametrize("name,reference,signed_ref,optional", ACCEPTED,
                         ids=[r[0] for r in ACCEPTED])
def test_format_table_accepted(corpus, name, reference, signed_ref, optional):
    payload = verify_fixture(name, reference)
    assert payload.docker_reference == signed_ref
    assert payload.manifest_digest == SIGNED_DIGEST
    assert payload.optional == optional


@pytest.mark.parametrize("name,reference,reason", REJECTED,
                         ids=[f"{r[0]}:{r[1]}" for r in REJECTED])
def test_format_table_rejected(corpus, name, reference, reason):
    with pytest.raises(SigningError, match=reason):
        verify_fixture(name, reference)


def test_format_table_keys(corpus):
    with pytest.raises(SigningError, match="does not verify with the public key"):
        verify_fixture("dir-img-cosign-valid", SAMPLE, keys=("cosign2.pub",))
    for keys in (("cosign.pub", "cosign2.pub"), ("cosign2.pub", "cosign.pub")):
        assert verify_fixture("dir-img-cosign-valid", SAMPLE, keys=keys).docker_reference \
            == SAMPLE
    with pytest.raises(SigningError, match="does not verify with any of the 2 public keys"):
        verify_fixture("unknown-cosign-key.signature", SAMPLE,
                       keys=("cosign.pub", "cosign2.pub"))


def test_mixed_lists_why_the_bad_one_failed(corpus):
    """One valid signature suffices; when none does, each failure is named."""
    with pytest.raises(SigningError) as e:
        verify_fixture("dir-img-cosign-mixed", "other/repo:1")
    assert len(e.value.reasons) == 2
    assert "does not verify" in e.value.reasons[0]
    assert "is not accepted" in e.value.reasons[1]


def test_containers_image_identity_rules_on_fixtures(corpus):
    """What containers/image's own tests find: cosign signs a name-only reference, which
    its matchRepoDigestOrExact and matchExact refuse and matchRepository accepts; the
    skopeo signature names a tag and passes matchExact for that tag only."""
    with pytest.raises(SigningError, match=r"not accepted .*match_repo_digest_or_exact"):
        verify_fixture("dir-img-cosign-valid", SAMPLE + ":latest",
                       rule=match_repo_digest_or_exact)
    with pytest.raises(SigningError, match="not accepted"):
        verify_fixture("dir-img-cosign-valid", SAMPLE, rule=match_exact)
    assert verify_fixture("dir-img-cosign-valid", SAMPLE, rule=match_repository)
    tagged = "192.168.64.2:5000/skopeo-signed"
    assert verify_fixture("dir-img-cosign-valid-with-tag", tagged + ":tag", rule=match_exact)
    with pytest.raises(SigningError, match="not accepted"):
        verify_fixture("dir-img-cosign-valid-with-tag", tagged + ":othertag", rule=match_exact)
    # pulled by digest: any tagged reference of the repository will do
    assert verify_fixture("dir-img-cosign-valid-with-tag", f"{tagged}@{SIGNED_DIGEST}",
                          rule=match_repo_digest_or_exact)


def test_make_payload_is_byte_identical_to_cosign_and_skopeo(corpus):
    """kiln's payload bytes for the same inputs equal those cosign (optional null) and
    containers/image (optional object) signed."""
    cosign = read_containers_signature(
        fixture_bytes(FIXTURES / "dir-img-cosign-valid" / "signature-1"), where="cosign")
    assert make_payload(SAMPLE, SIGNED_DIGEST) == cosign.payload
    skopeo = read_containers_signature(
        fixture_bytes(FIXTURES / "dir-img-cosign-valid-with-tag" / "signature-1"),
        where="skopeo")
    assert make_payload("192.168.64.2:5000/skopeo-signed:tag", SIGNED_DIGEST,
                        {"timestamp": 1657296609, "creator": "containers/image 5.21.2-dev"}
                        ) == skopeo.payload


# --- identity rules -----------------------------------------------------------------------


@pytest.mark.parametrize("rule,signed,image,result", [
    (match_repo_digest_or_exact, "docker.io/library/busybox:latest", "busybox", True),
    (match_repo_digest_or_exact, "busybox:1", "busybox:latest", False),
    (match_repo_digest_or_exact, "busybox", "busybox:latest", False),
    (match_repo_digest_or_exact, "busybox:1", f"busybox@{D1}", True),
    (match_repo_digest_or_exact, "alpine:1", f"busybox@{D1}", False),
    (match_repo_digest_or_exact, f"busybox@{D1}", f"busybox@{D2}", True),
    (match_repo_or_exact, "index.docker.io/library/busybox", "busybox:1.36", True),
    (match_repo_or_exact, "index.docker.io/library/busybox", f"busybox@{D1}", True),
    (match_repo_or_exact, "index.docker.io/library/alpine", "busybox", False),
    (match_repo_or_exact, "busybox:1", "busybox:2", False),
    (match_repo_or_exact, "busybox:1", "busybox:1", True),
    (match_exact, "busybox:latest", "busybox", True),
    (match_exact, "busybox", "busybox", False),
    (match_repository, "busybox:1", "docker.io/library/busybox:2", True),
    (match_repository, "not a reference", "busybox", False),
    (match_repo_or_exact, "UPPER/case", "upper/case", False),
])
def test_identity_rules(rule, signed, image, result):
    assert rule(signed, image) is result


# --- round trip and each refusal ----------------------------------------------------------


def test_round_trip(key, pub):
    sig = create_signature(key, REPO, D1)
    assert sig.annotations == {SIGNATURE_ANNOTATION: sig.signature}
    payload = verify_signature(sig, [pub], manifest_digest=D1,
                               identity=ImageIdentity(REPO + ":1.4"))
    assert (payload.docker_reference, payload.manifest_digest, payload.optional) == (REPO, D1,
                                                                                     None)
    # the same through containers/image's on-disk form
    again = read_containers_signature(containers_signature_bytes(sig), where="disk")
    assert again == sig
    assert verify_any([again], [pub], manifest_digest=D1, identity=ImageIdentity(REPO))


def test_optional_null_and_object(key, pub):
    for optional in (None, {"creator": "kiln 0.1.0", "timestamp": 1700000000,
                            "note": "<a&b>", "nested": {"x": [1, "y"]}}):
        sig = create_signature(key, REPO, D1, optional)
        text = sig.payload.decode()
        assert text.endswith('"optional":null}') == (optional is None)
        if optional:
            assert "\\u003ca\\u0026b\\u003e" in text  # Go's escaping
        got = verify_signature(sig, [pub], manifest_digest=D1, identity=ImageIdentity(REPO))
        assert got.optional == optional


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


def test_tampering_is_refused(key, pub):
    sig = create_signature(key, REPO, D1)
    der = base64.b64decode(sig.signature)
    ident = ImageIdentity(REPO)
    cases = {
        "payload": (Signature(_flip(sig.payload, sig.payload.index(b"team")), sig.signature),
                    "does not verify with the public key"),
        "signature": (Signature(sig.payload, base64.b64encode(_flip(der, len(der) - 1)).decode()),
                      "does not verify with the public key"),
        "truncated DER": (Signature(sig.payload, base64.b64encode(der[:-4]).decode()),
                          "not an ASN.1 DER ECDSA signature"),
        "DER + trailing byte": (Signature(sig.payload, base64.b64encode(der + b"\0").decode()),
                                "not an ASN.1 DER ECDSA signature"),
        "truncated base64": (Signature(sig.payload, sig.signature[:-3]),
                             "not valid base64"),
        "non-base64": (Signature(sig.payload, "not*base64!"), "not valid base64"),
        "empty": (Signature(sig.payload, ""), "no signature"),
        "oversized signature": (Signature(sig.payload, "A" * (64 * 1024 + 4)),
                                "more than 65536"),
        "oversized payload": (Signature(b" " * (4 * 1024 * 1024 + 1), sig.signature),
                              "more than 4194304"),
        "media type": (Signature(sig.payload, sig.signature, {}, "text/plain"),
                       "not a simple-signing signature"),
    }
    for what, (bad, message) in cases.items():
        with pytest.raises(SigningError, match=re.escape(message)):
            verify_signature(bad, [pub], manifest_digest=D1, identity=ident)
        assert what


def test_other_digest_reference_and_key_are_refused(key, pub):
    sig = create_signature(key, REPO, D1)
    with pytest.raises(SigningError, match=f"signature is for {D1} not {D2}"):
        verify_signature(sig, [pub], manifest_digest=D2, identity=ImageIdentity(REPO))
    with pytest.raises(SigningError, match=re.escape(
            f"signature identity '{REPO}' is not accepted for image "
            "registry.example.com/team/other:1 (match_repo_or_exact)")):
        verify_signature(sig, [pub], manifest_digest=D1,
                         identity=ImageIdentity("registry.example.com/team/other:1"))
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(SigningError, match="does not verify with the public key"):
        verify_signature(sig, [other], manifest_digest=D1, identity=ImageIdentity(REPO))
    assert verify_signature(sig, [other, pub], manifest_digest=D1, identity=ImageIdentity(REPO))


def test_signed_but_not_strict_payloads_are_refused(key, pub):
    """Authentic signatures over payloads containers/image would not accept."""
    good = json.loads(make_payload(REPO, D1))
    extra = dict(good, extra=1)
    wrong_type = json.loads(json.dumps(good))
    wrong_type["critical"]["type"] = "atomic container signature"
    for doc, message in ((extra, "payload has unknown key 'extra'"),
                         (wrong_type, "payload type is 'atomic container signature', not "
                                      f"'{COSIGN_TYPE}'")):
        raw = json.dumps(doc).encode()
        sig = Signature(raw, sign_payload(key, raw))
        with pytest.raises(SigningError, match=re.escape(f"signed payload refused: {message}")):
            verify_signature(sig, [pub], manifest_digest=D1, identity=ImageIdentity(REPO))


def test_verify_any_without_signatures_or_keys(pub):
    with pytest.raises(SigningError, match=f"no signatures for {D1}"):
        verify_any([], [pub], manifest_digest=D1, identity=ImageIdentity(REPO))
    with pytest.raises(SigningError, match="no public keys"):
        verify_any([Signature(b"{}", "AA==")], [], manifest_digest=D1,
                   identity=ImageIdentity(REPO))


# --- the strict payload parser ------------------------------------------------------------

_GOOD = make_payload(REPO, D1).decode()
_CRIT = _GOOD[len('{"critical":'):-len(',"optional":null}')]


@pytest.mark.parametrize("raw,message", [
    (f'{{"critical":{_CRIT},"critical":{_CRIT},"optional":null}}',
     "payload has the key 'critical' twice"),
    (_GOOD.replace(f'{{"docker-reference":"{REPO}"}}',
                   f'{{"docker-reference":"{REPO}","docker-reference":"x/y"}}'),
     "critical.identity has the key 'docker-reference' twice"),
    (_GOOD.replace('"type"', '"type":"x","type"'), "critical has the key 'type' twice"),
    (_GOOD[:-1] + ',"extra":1}', "payload has unknown key 'extra'"),
    (_GOOD.replace('"type":', '"extra":1,"type":'), "critical has unknown key 'extra'"),
    (_GOOD.replace(f'"{D1}"', f'"{D1}","size":1'), "image has unknown key 'size'"),
    (_GOOD.replace(',"optional":null', ""), "payload lacks the key 'optional'"),
    (_GOOD.replace(f',"type":"{COSIGN_TYPE}"', ""), "critical lacks the key 'type'"),
    (_GOOD.replace(f'"docker-reference":"{REPO}"', '"docker-reference":7'),
     "docker-reference is not a string"),
    (_GOOD.replace(f'"{D1}"', "null"), "docker-manifest-digest is not a string"),
    (_GOOD.replace(f'"{COSIGN_TYPE}"', '["x"]'), "critical.type is not a string"),
    (_GOOD.replace(f'"{D1}"', '"sha256:abc"'), "payload manifest digest"),
    ('{"critical":null,"optional":null}', "payload critical is not a JSON object"),
    (_GOOD.replace('"optional":null', '"optional":[]'), "optional is neither null nor"),
    (_GOOD.replace('"optional":null', '"optional":{"creator":1}'), "creator is not a string"),
    (_GOOD.replace('"optional":null', '"optional":{"timestamp":1.5}'), "not an integer"),
    (_GOOD.replace('"optional":null', '"optional":{"timestamp":"1"}'), "not a number"),
    (_GOOD.replace('"optional":null', '"optional":{"a":1,"a":2}'), "optional has the key 'a'"),
    (_GOOD.replace('"optional":null', '"optional":{"x":NaN}'), "not valid JSON"),
    (_GOOD + "x", "not valid JSON"),
    ("\ufeff" + _GOOD, "not valid JSON"),
    ("[]", "payload is not a JSON object"),
])
def test_parse_payload_is_strict(raw, message):
    with pytest.raises(SigningError, match=re.escape(message)):
        parse_payload(raw.encode())


def test_parse_payload_accepts_what_containers_image_accepts():
    assert parse_payload(_GOOD.encode()).optional is None
    p = parse_payload(_GOOD.replace('"optional":null',
                                    '"optional":{"timestamp":1.0,"other":{"z":[1,{}]}}').encode())
    assert p.optional == {"timestamp": 1.0, "other": {"z": [1, {}]}}
    spaced = json.dumps(json.loads(_GOOD), indent=2).encode()  # any layout, same content
    assert parse_payload(spaced) == parse_payload(_GOOD.encode())
    with pytest.raises(SigningError, match="not UTF-8"):
        parse_payload(b'{"critical":"\xff"}')


# --- independent implementations: openssl -------------------------------------------------


def _openssl_verify(tmp_path: Path, public_pem: bytes, payload: bytes, der: bytes):
    (tmp_path / "pub.pem").write_bytes(public_pem)
    (tmp_path / "payload").write_bytes(payload)
    (tmp_path / "sig.der").write_bytes(der)
    return subprocess.run(["openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature",
                           "sig.der", "payload"], cwd=tmp_path, capture_output=True, text=True)


def test_openssl_verifies_kiln_signatures(tmp_path, key_pair, key):
    sig = create_signature(key, REPO, D1)
    der = base64.b64decode(sig.signature)
    ok = _openssl_verify(tmp_path, key_pair[1], sig.payload, der)
    assert ok.returncode == 0 and ok.stdout.strip() == "Verified OK", ok.stdout + ok.stderr
    bad = _openssl_verify(tmp_path, key_pair[1], _flip(sig.payload, 10), der)
    assert bad.returncode != 0 and "Verification failure" in bad.stdout + bad.stderr


def test_kiln_verifies_openssl_signatures(tmp_path, key, pub):
    payload = make_payload(REPO, D1)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (tmp_path / "payload").write_bytes(payload)
    subprocess.run(["openssl", "dgst", "-sha256", "-sign", "key.pem", "-out", "sig.der",
                    "payload"], cwd=tmp_path, check=True, capture_output=True)
    sig = Signature(payload, base64.b64encode((tmp_path / "sig.der").read_bytes()).decode())
    assert verify_signature(sig, [pub], manifest_digest=D1, identity=ImageIdentity(REPO))


# --- the encrypted key file ---------------------------------------------------------------


def _pem_body(pem: bytes) -> bytes:
    return base64.b64decode(b"".join(pem.strip().splitlines()[1:-1]))


def test_key_file_is_cosigns_format(tmp_path, key_pair):
    private_pem, public_pem, key = key_pair
    lines = private_pem.decode().splitlines()
    assert lines[0] == "-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----"
    assert lines[-1] == "-----END ENCRYPTED SIGSTORE PRIVATE KEY-----"
    assert all(len(line) <= 64 for line in lines[1:-1]) and private_pem.endswith(b"-----\n")
    body = _pem_body(private_pem)
    doc = json.loads(body)
    assert body == json.dumps(doc, separators=(",", ":")).encode()  # compact, as Go writes
    assert list(doc) == ["kdf", "cipher", "ciphertext"]
    assert list(doc["kdf"]) == ["name", "params", "salt"]
    assert doc["kdf"]["name"] == "scrypt"
    assert doc["kdf"]["params"] == {"N": 32768, "r": 8, "p": 1}
    assert list(doc["kdf"]["params"]) == ["N", "r", "p"]
    assert doc["cipher"]["name"] == "nacl/secretbox"
    salt = base64.b64decode(doc["kdf"]["salt"])
    nonce = base64.b64decode(doc["cipher"]["nonce"])
    assert (len(salt), len(nonce)) == (32, 24)
    # decrypt without kiln's loader: hashlib's scrypt and PyNaCl directly
    box_key = hashlib.scrypt(PASSWORD, salt=salt, n=32768, r=8, p=1, dklen=32,
                             maxmem=64 << 20)
    plain = nacl.secret.SecretBox(box_key).decrypt(base64.b64decode(doc["ciphertext"]), nonce)
    loaded = serialization.load_der_private_key(plain, password=None)
    assert isinstance(loaded.curve, ec.SECP256R1)
    assert plain == loaded.private_bytes(serialization.Encoding.DER,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
    assert loaded.private_numbers() == key.private_numbers()
    assert public_pem == loaded.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "plain.der").write_bytes(plain)
    asn1 = subprocess.run(["openssl", "asn1parse", "-inform", "DER", "-in", "plain.der"],
                          cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    # PKCS#8: version 0, then AlgorithmIdentifier id-ecPublicKey / prime256v1
    assert re.search(r"INTEGER\s+:00\s.*SEQUENCE.*:id-ecPublicKey.*:prime256v1", asn1, re.S), asn1


def test_wrong_password_and_names(key_pair):
    private_pem = key_pair[0]
    with pytest.raises(KeyError_, match="wrong password or corrupted key") as e:
        load_private_key(private_pem, b"hunter2", where="/keys/cosign.key")
    assert str(e.value).startswith("/keys/cosign.key: ")
    assert "hunter2" not in str(e.value) and PASSWORD.decode() not in str(e.value)
    doc = json.loads(_pem_body(private_pem))
    ct = base64.b64decode(doc["ciphertext"])
    doc["ciphertext"] = base64.b64encode(_flip(ct, 40)).decode()
    with pytest.raises(KeyError_, match="wrong password or corrupted key"):
        load_private_key(_wrap(doc), PASSWORD)


def _wrap(doc: dict, pem_type: str = "ENCRYPTED SIGSTORE PRIVATE KEY") -> bytes:
    body = base64.b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode()
    return f"-----BEGIN {pem_type}-----\n{body}\n-----END {pem_type}-----\n".encode()


def test_older_cosign_pem_type_is_read(key_pair):
    doc = json.loads(_pem_body(key_pair[0]))
    loaded = load_private_key(_wrap(doc, "ENCRYPTED COSIGN PRIVATE KEY"), PASSWORD)
    assert loaded.private_numbers() == key_pair[2].private_numbers()


@pytest.mark.parametrize("params", [{"N": 2**40, "r": 8, "p": 1}, {"N": 32768, "r": 2**20, "p": 1},
                                    {"N": 32768, "r": 8, "p": 2**20}, {"N": 99, "r": 99, "p": 99},
                                    {"N": "32768", "r": 8, "p": 1}])
def test_hostile_kdf_parameters_are_refused_fast(params):
    salt = base64.b64encode(b"s" * 32).decode()
    doc = {"kdf": {"name": "scrypt", "params": params, "salt": salt},
           "cipher": {"name": "nacl/secretbox", "nonce": base64.b64encode(b"n" * 24).decode()},
           "ciphertext": base64.b64encode(b"c" * 154).decode()}
    start = time.monotonic()
    with pytest.raises(KeyError_, match="unsupported scrypt parameters"):
        load_private_key(_wrap(doc), b"x")
    assert time.monotonic() - start < 0.5


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["cipher"].update(nonce=base64.b64encode(b"n" * 23).decode()),
     "nonce is 23 bytes"),
    (lambda d: d["kdf"].update(name="pbkdf2"), "unsupported key derivation 'pbkdf2'"),
    (lambda d: d["cipher"].update(name="aes-gcm"), "unsupported cipher 'aes-gcm'"),
    (lambda d: d.update(ciphertext="***"), "'ciphertext' is not valid base64"),
    (lambda d: d.pop("kdf"), "no 'kdf' object"),
])
def test_malformed_key_files(key_pair, mutate, message):
    doc = json.loads(_pem_body(key_pair[0]))
    mutate(doc)
    with pytest.raises(KeyError_, match=re.escape(message)):
        load_private_key(_wrap(doc), PASSWORD, where="k")


def test_unusable_keys_are_named():
    with pytest.raises(KeyError_, match="k.pem: not a PEM file"):
        load_private_key(b"garbage", b"", where="k.pem")
    plain = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    with pytest.raises(KeyError_, match="'PRIVATE KEY' is not an encrypted cosign private key"):
        load_private_key(plain, b"")
    with pytest.raises(KeyError_, match="is not a public key"):
        load_public_key(plain)
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(KeyError_, match="P-256 keys only, not curve secp384r1"):
        load_public_key(p384.public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    rsa_pub = rsa.generate_private_key(65537, 2048).public_key()
    with pytest.raises(KeyError_, match="P-256 keys only, not RSAPublicKey"):
        load_public_key(rsa_pub.public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(KeyError_, match="larger than"):
        load_public_key(b"-" * (70 << 10))
    with pytest.raises(KeyError_, match="P-256 keys only"):
        encrypt_private_key(ec.generate_private_key(ec.SECP384R1()), b"")


# Key files cosign itself wrote (sigstore/cosign pkg/cosign/keys_test.go, password "hello").
COSIGN_SIGSTORE_KEY = b"""-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----
eyJrZGYiOnsibmFtZSI6InNjcnlwdCIsInBhcmFtcyI6eyJOIjozMjc2OCwiciI6
OCwicCI6MX0sInNhbHQiOiI3T3VGd2VsbWZZNXVId2NoaURSc210anNwZ2ZlZjFG
Mk5lOGFDTjVLYVpZPSJ9LCJjaXBoZXIiOnsibmFtZSI6Im5hY2wvc2VjcmV0Ym94
Iiwibm9uY2UiOiJQNHk4OGhCb3ZTa09MbXN0bFVBaGJwdDJ0K2xTNUxQSCJ9LCJj
aXBoZXJ0ZXh0IjoiMnB1QzdyZldJOWh3bnJlQ2s4aUZDRlVwQlRrSzRJNlIvbFBF
cnBDekpXUGpJWXl4eGVIL1A2VW52cFJHdVhla1NNb3JMdGhLamdoQ1JlNy82NDVH
QWtoVm1LRC92eEF0S2EvbE1abENSQ3FlekJGUFd1dzNpeFRtZ2xhb2J1ZFVSbUVs
bmNGOGlZbzBTMVl6Y1ZOMVFwY2J2c0dNcUlYRzVlbmdteGp5dCtBcXlyZTF0Q0Y0
V01tU1BlaEljNlBqd2h1Q2xHaVpJUWRvTGc9PSJ9
-----END ENCRYPTED SIGSTORE PRIVATE KEY-----
"""
# An EC key in SEC1 form inside the envelope: cosign refuses it ("use ParseECPrivateKey").
COSIGN_SEC1_KEY = b"""-----BEGIN ENCRYPTED COSIGN PRIVATE KEY-----
eyJrZGYiOnsibmFtZSI6InNjcnlwdCIsInBhcmFtcyI6eyJOIjo2NTUzNiwiciI6
OCwicCI6MX0sInNhbHQiOiJHK3F5WTYrNzhNS0JzMXNGTGs1ajYwcS9kS3Z1czBW
VkhlSHZybC9POTF3PSJ9LCJjaXBoZXIiOnsibmFtZSI6Im5hY2wvc2VjcmV0Ym94
Iiwibm9uY2UiOiJRc2JGdG13WDRDK2ttV3ZCcVRaMEFGOUFYdk1jRmg1SCJ9LCJj
aXBoZXJ0ZXh0IjoiREM5T28zeldiYVQzSXYwdFVnWEdycjUxYW1samwwNlQ5MTNP
VkxPbWpuMWhnK2o2WXRUbWg3SGhZSlY1N2J5eGE0Q281bE9YYmRqbTJ3aklubEd1
Um5aZCt5OExnekpSNzFSeEhKVzgrWmRlcFJmYWJMTjdHbDgrSFZEcERVQ3NxQnRh
VngyblpGbFEwWUl1anZwbFphblNGaUVvdERLVGkxZ3VhUXIwUHNzYU01NXZxbTRY
WS9rPSJ9
-----END ENCRYPTED COSIGN PRIVATE KEY-----
"""


def test_keys_cosign_wrote():
    key = load_private_key(COSIGN_SIGSTORE_KEY, b"hello", where="cosign.key")
    pub = load_public_key(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    sig = create_signature(key, REPO, D1)
    assert verify_signature(sig, [pub], manifest_digest=D1, identity=ImageIdentity(REPO))
    with pytest.raises(KeyError_, match="cosign.key: wrong password"):
        load_private_key(COSIGN_SIGSTORE_KEY, b"hell0", where="cosign.key")
    with pytest.raises(KeyError_, match="not PKCS#8"):
        load_private_key(COSIGN_SEC1_KEY, b"hello")


# go-securesystemslib encrypted/encrypted_test.go: Go-made envelopes under "supersecret", one
# per parameter set it writes (legacy = cosign's, standard, OWASP). The first (TestDecrypt)
# seals b"reallyimportant" itself; the others (kdfVectors, made by its Marshal) seal the
# JSON encoding of those bytes.
GO_ENVELOPES = [
    '{"kdf":{"name":"scrypt","params":{"N":32768,"r":8,"p":1},"salt":"N9a7x5JFGbrtB2uBR81jPwp0eiLR4'
    'A7FV3mjVAQrg1g="},"cipher":{"name":"nacl/secretbox","nonce":"2h8HxMmgRfuYdpswZBQaU3xJ1nkA/5Ik"'
    '},"ciphertext":"SEW6sUh0jf2wfdjJGPNS9+bkk2uB+Cxamf32zR8XkQ=="}',
    '{"kdf":{"name":"scrypt","params":{"N":65536,"r":8,"p":1},"salt":"FhzPOt9/bJG4PTq6lQ6ecG6GzaOuO'
    'y/ynG5+yRiFlNs="},"cipher":{"name":"nacl/secretbox","nonce":"aw1ng1jHaDz/tQ7V2gR9O2+IGQ8xJEuE"'
    '},"ciphertext":"HycvuLZL4sYH0BrYTh4E/H20VtAW6u5zL5Pr+IBjYLYnCPzDkq8="}',
    '{"kdf":{"name":"scrypt","params":{"N":131072,"r":8,"p":1},"salt":"m38E3kouJTtiheLQN22NQ8DTito5'
    'hrjpUIskqcd375k="},"cipher":{"name":"nacl/secretbox","nonce":"Y6PM13yA+o44pE/W1ZBwczeGnTV/m9Zc'
    '"},"ciphertext":"6H8sqj1K6B6yDjtH5AQ6lbFigg/C2yDDJc4rYJ79w9aVPImFIPI="}',
]


@pytest.mark.parametrize("envelope,plaintext", list(zip(GO_ENVELOPES, [
    b"reallyimportant", b'"cmVhbGx5aW1wb3J0YW50"', b'"cmVhbGx5aW1wb3J0YW50"'], strict=True)),
    ids=["N32768", "N65536", "N131072"])
def test_go_securesystemslib_envelopes(envelope, plaintext):
    assert decrypt_secret(envelope.encode(), b"supersecret") == plaintext
    with pytest.raises(KeyError_, match="wrong password"):
        decrypt_secret(envelope.encode(), b"supersecreT")


# --- containers/image on-disk signatures --------------------------------------------------


@pytest.mark.parametrize("raw,message", [
    (b'{"critical":{}}', "not a sigstore signature"),
    (b"\x00simple-signing\n{}", "format 'simple-signing' is not sigstore-json"),
    (b"\x00sigstore-json\n[", "not valid JSON"),
    (b'\x00sigstore-json\n{"mimeType":1,"payload":""}', "no mimeType string"),
    (b'\x00sigstore-json\n{"mimeType":"m","payload":"%%"}', "payload is not valid base64"),
    (b'\x00sigstore-json\n{"mimeType":"m","payload":"","annotations":{"a":1}}',
     "annotations are not a string map"),
])
def test_read_containers_signature_refusals(raw, message):
    with pytest.raises(SigningError, match=re.escape(message)):
        read_containers_signature(raw, where="sig")


def test_signature_without_annotation(pub):
    raw = (b'\x00sigstore-json\n{"mimeType":"%s","payload":"%s","annotations":{}}'
           % (SIMPLESIGNING_MEDIA_TYPE.encode(), base64.b64encode(make_payload(REPO, D1))))
    sig = read_containers_signature(raw, where="sig")
    assert sig.signature == "" and sig.media_type == SIMPLESIGNING_MEDIA_TYPE
    with pytest.raises(SigningError, match=f"annotation {SIGNATURE_ANNOTATION} missing"):
        verify_signature(sig, [pub], manifest_digest=D1, identity=ImageIdentity(REPO))


def test_sign_payload_signs_the_exact_bytes(key, pub):
    """No re-serialisation: a payload with odd spacing verifies as is, and not otherwise."""
    raw = json.dumps(json.loads(make_payload(REPO, D1)), indent=3).encode()
    sig = Signature(raw, sign_payload(key, raw))
    assert verify_signature(sig, [pub], manifest_digest=D1, identity=ImageIdentity(REPO))
    der = base64.b64decode(sig.signature)
    pub.verify(der, raw, ec.ECDSA(hashes.SHA256()))  # raises if not over exactly these bytes
    with pytest.raises(SigningError, match="does not verify"):
        verify_signature(Signature(make_payload(REPO, D1), sig.signature), [pub],
                         manifest_digest=D1, identity=ImageIdentity(REPO))


def test_copying_a_signature_manifest_moves_each_blob_once():
    from store.documents import Descriptor
    from store.signatures import (
        StoredSignature,
        build_signature_manifest,
        copy_signature_manifest,
    )

    sigs = [StoredSignature(b'{"critical": %d}' % i, f"c2ln{i}", {}) for i in range(3)]
    manifest, config, payloads = build_signature_manifest(sigs)
    source = {sha256_digest(b): b for b in (config, *payloads)}
    reads: list[str] = []
    copied: dict[str, bytes] = {}

    def read_blob(digest: str, size: int) -> bytes:
        reads.append(digest)
        return source[digest]

    def put_bytes(data: bytes, media_type: str) -> Descriptor:
        copied[sha256_digest(data)] = data
        return Descriptor(media_type, sha256_digest(data), len(data))

    desc = copy_signature_manifest(manifest, read_blob, put_bytes, where="x:sha256-0.sig")
    assert desc.digest == sha256_digest(manifest)
    assert copied == {**source, desc.digest: manifest}
    assert sorted(reads) == sorted(source)  # every blob read, none twice
