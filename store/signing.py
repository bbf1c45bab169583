"""cosign-compatible image signatures: keys, the simple-signing payload, sign and verify.

A signature is ECDSA P-256 over SHA-256 of the exact payload bytes, ASN.1 DER, base64.
The payload is cosign's "simple signing" JSON naming a manifest digest and a docker
reference. Private keys are kept in cosign's encrypted format (the JSON envelope of
go-securesystemslib's ``encrypted`` package: scrypt-derived key, NaCl secretbox, PKCS#8
plaintext, PEM type ``ENCRYPTED SIGSTORE PRIVATE KEY``), so the same key file works with
``cosign sign --key`` and ``skopeo copy --sign-by-sigstore-private-key``.

Verification authenticates before it parses: the payload bytes are checked against the
keys first and only then read (strictly, as containers/image reads them); then the
manifest digest, then the identity. Nothing is ever re-serialised before hashing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import nacl.exceptions
import nacl.secret
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from store.digest import validate_digest
from store.errors import DigestError, KilnError

SIMPLESIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
COSIGN_TYPE = "cosign container image signature"

SIGSTORE_KEY_PEM_TYPE = "ENCRYPTED SIGSTORE PRIVATE KEY"
COSIGN_KEY_PEM_TYPE = "ENCRYPTED COSIGN PRIVATE KEY"  # older cosign; read, never written
CONTAINERS_SIGSTORE_PREFIX = b"\x00sigstore-json\n"

MAX_PAYLOAD_BYTES = 4 << 20
MAX_SIGNATURE_B64 = 64 << 10
MAX_KEY_FILE_BYTES = 64 << 10
MAX_CONTAINERS_SIGNATURE_BYTES = MAX_PAYLOAD_BYTES * 4 // 3 + MAX_SIGNATURE_B64 + (64 << 10)

# cosign's defaults (go-securesystemslib "legacy"): N=32768, r=8, p=1, 32-byte salt, 24-byte
# nonce. go-securesystemslib reads exactly these three parameter sets and no others, which
# also bounds what a hostile key file can make us spend (N=131072, r=8: 128 MiB, ~0.4 s).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 32768, 8, 1
ACCEPTED_SCRYPT_PARAMS = frozenset({(32768, 8, 1), (65536, 8, 1), (131072, 8, 1)})
_SCRYPT_MAXMEM = 256 << 20
_SALT_BYTES = 32
_KEY_BYTES = 32
_INT64 = (-(1 << 63), (1 << 63) - 1)


class SigningError(KilnError):
    """A signature, payload or key is refused; the message says which check failed.

    ``reasons`` lists one line per signature when several were tried (verify_any).
    """

    def __init__(self, message: str, reasons: Sequence[str] = ()):
        super().__init__(message)
        self.reasons = list(reasons)


class KeyError_(SigningError):
    """A key file cannot be used: malformed, unsupported, or the wrong password."""


# --- keys -------------------------------------------------------------------------------


def generate_key_pair(password: bytes) -> tuple[bytes, bytes]:
    """A new ECDSA P-256 key pair: (encrypted private key PEM, public key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return encrypt_private_key(key, password), public_key_pem(key.public_key())


def public_key_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def encrypt_private_key(key: ec.EllipticCurvePrivateKey, password: bytes) -> bytes:
    """``key`` as cosign writes it: PKCS#8 DER sealed by encrypt_secret, in PEM."""
    _require_p256(key, "key")
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return _pem_encode(SIGSTORE_KEY_PEM_TYPE, encrypt_secret(der, password))


def encrypt_secret(plaintext: bytes, password: bytes) -> bytes:
    """go-securesystemslib's envelope: compact JSON in Go's field order, fresh salt/nonce."""
    salt = os.urandom(_SALT_BYTES)
    nonce = os.urandom(nacl.secret.SecretBox.NONCE_SIZE)
    box_key = _scrypt(_password_bytes(password), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    sealed = nacl.secret.SecretBox(box_key).encrypt(plaintext, nonce).ciphertext
    envelope = {
        "kdf": {"name": "scrypt", "params": {"N": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
                "salt": _b64(salt)},
        "cipher": {"name": "nacl/secretbox", "nonce": _b64(nonce)},
        "ciphertext": _b64(sealed),
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


def decrypt_secret(envelope: bytes, password: bytes, *, where: str = "key") -> bytes:
    """Open a go-securesystemslib envelope; KeyError_ on any defect or the wrong password."""
    try:
        doc = json.loads(envelope.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise KeyError_(f"{where}: encrypted key body is not JSON") from None
    if not isinstance(doc, dict):
        raise KeyError_(f"{where}: encrypted key body is not a JSON object")
    kdf = _object_field(doc, "kdf", where)
    cipher = _object_field(doc, "cipher", where)
    if kdf.get("name") != "scrypt":
        raise KeyError_(f"{where}: unsupported key derivation {kdf.get('name')!r} (want scrypt)")
    if cipher.get("name") != "nacl/secretbox":
        raise KeyError_(f"{where}: unsupported cipher {cipher.get('name')!r} "
                        "(want nacl/secretbox)")
    params = _object_field(kdf, "params", where)
    n, r, p = (params.get(k) for k in ("N", "r", "p"))
    if not all(type(v) is int for v in (n, r, p)) or (n, r, p) not in ACCEPTED_SCRYPT_PARAMS:
        raise KeyError_(f"{where}: unsupported scrypt parameters N={n!r}, r={r!r}, p={p!r} "
                        "(cosign reads N=32768, 65536 or 131072 with r=8, p=1)")
    salt = _b64_field(kdf, "salt", where)
    nonce = _b64_field(cipher, "nonce", where)
    sealed = _b64_field(doc, "ciphertext", where)
    if len(nonce) != nacl.secret.SecretBox.NONCE_SIZE:
        raise KeyError_(f"{where}: secretbox nonce is {len(nonce)} bytes, not "
                        f"{nacl.secret.SecretBox.NONCE_SIZE}")
    if not salt:
        raise KeyError_(f"{where}: scrypt salt is empty")
    box_key = _scrypt(_password_bytes(password), salt, n, r, p)
    try:
        return nacl.secret.SecretBox(box_key).decrypt(sealed, nonce)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise KeyError_(f"{where}: wrong password or corrupted key "
                        "(the secretbox does not open)") from None


def load_private_key(pem: bytes, password: bytes, *,
                     where: str = "key") -> ec.EllipticCurvePrivateKey:
    """A cosign/skopeo/kiln encrypted private key (SIGSTORE or older COSIGN PEM type)."""
    pem_type, body = _pem_decode(pem, where)
    if pem_type not in (SIGSTORE_KEY_PEM_TYPE, COSIGN_KEY_PEM_TYPE):
        raise KeyError_(f"{where}: PEM type {pem_type!r} is not an encrypted cosign private key "
                        f"(want {SIGSTORE_KEY_PEM_TYPE!r})")
    der = decrypt_secret(body, password, where=where)
    if not _is_pkcs8(der):
        raise KeyError_(f"{where}: decrypted key is not PKCS#8 (as cosign requires)")
    try:
        key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyError_(f"{where}: decrypted key is not a valid PKCS#8 private key") from None
    _require_p256(key, where)
    return key


def load_public_key(pem: bytes, *, where: str = "key") -> ec.EllipticCurvePublicKey:
    """A PEM ``PUBLIC KEY`` (SubjectPublicKeyInfo) holding an ECDSA P-256 key."""
    if not isinstance(pem, bytes | bytearray):
        raise KeyError_(f"{where}: public key must be bytes")
    if len(pem) > MAX_KEY_FILE_BYTES:
        raise KeyError_(f"{where}: public key file is larger than {MAX_KEY_FILE_BYTES} bytes")
    pem_type, _ = _pem_decode(bytes(pem), where)
    if pem_type != "PUBLIC KEY":
        raise KeyError_(f"{where}: PEM type {pem_type!r} is not a public key "
                        "(want 'PUBLIC KEY')")
    try:
        key = serialization.load_pem_public_key(bytes(pem))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyError_(f"{where}: not a valid PEM public key") from None
    _require_p256(key, where)
    return key


def _require_p256(key: object, where: str) -> None:
    if not isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        kind = type(key).__name__.lstrip("_")
        raise KeyError_(f"{where}: kiln supports ECDSA P-256 keys only, not {kind}")
    if not isinstance(key.curve, ec.SECP256R1):
        raise KeyError_(f"{where}: kiln supports ECDSA P-256 keys only, not curve "
                        f"{key.curve.name}")


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=_KEY_BYTES,
                          maxmem=_SCRYPT_MAXMEM)


def _password_bytes(password: bytes | str) -> bytes:
    if isinstance(password, str):
        return password.encode("utf-8")
    if not isinstance(password, bytes | bytearray):
        raise TypeError("password must be bytes")
    return bytes(password)


def _is_pkcs8(der: bytes) -> bool:
    """PrivateKeyInfo: SEQUENCE { INTEGER 0, AlgorithmIdentifier SEQUENCE, ... }.

    SEC1 (``EC PRIVATE KEY``) starts SEQUENCE { INTEGER 1, OCTET STRING ... }; cosign
    refuses that inside its envelope, and so does kiln.
    """
    if len(der) < 2 or der[0] != 0x30:
        return False
    if der[1] < 0x80:
        start = 2
    else:
        start = 2 + (der[1] & 0x7F)
    return der[start:start + 3] == b"\x02\x01\x00" and der[start + 3:start + 4] == b"\x30"


def _pem_encode(pem_type: str, body: bytes) -> bytes:
    text = base64.b64encode(body).decode("ascii")
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    return ("\n".join([f"-----BEGIN {pem_type}-----", *lines, f"-----END {pem_type}-----"])
            + "\n").encode("ascii")


def _pem_decode(pem: bytes, where: str) -> tuple[str, bytes]:
    """The first PEM block: (type, decoded body)."""
    if isinstance(pem, str):
        pem = pem.encode("utf-8", "replace")
    if not isinstance(pem, bytes | bytearray):
        raise KeyError_(f"{where}: key must be PEM bytes")
    if len(pem) > MAX_KEY_FILE_BYTES:
        raise KeyError_(f"{where}: key file is larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        text = pem.decode("ascii")
    except UnicodeDecodeError:
        raise KeyError_(f"{where}: not a PEM file (binary data)") from None
    lines = [line.strip() for line in text.splitlines()]
    begin = next((i for i, line in enumerate(lines)
                  if line.startswith("-----BEGIN ") and line.endswith("-----")), None)
    if begin is None:
        raise KeyError_(f"{where}: not a PEM file (no -----BEGIN line)")
    pem_type = lines[begin][len("-----BEGIN "):-len("-----")]
    end_line = f"-----END {pem_type}-----"
    try:
        end = lines.index(end_line, begin + 1)
    except ValueError:
        raise KeyError_(f"{where}: PEM block {pem_type!r} has no {end_line} line") from None
    body_lines = lines[begin + 1:end]
    if any(":" in line for line in body_lines):
        raise KeyError_(f"{where}: PEM headers are not supported")
    try:
        body = base64.b64decode("".join(body_lines), validate=True)
    except (binascii.Error, ValueError):
        raise KeyError_(f"{where}: PEM body is not valid base64") from None
    return pem_type, body


def _object_field(doc: dict, name: str, where: str) -> dict:
    value = doc.get(name)
    if not isinstance(value, dict):
        raise KeyError_(f"{where}: encrypted key has no {name!r} object")
    return value


def _b64_field(doc: dict, name: str, where: str) -> bytes:
    value = doc.get(name)
    if not isinstance(value, str):
        raise KeyError_(f"{where}: encrypted key field {name!r} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KeyError_(f"{where}: encrypted key field {name!r} is not valid base64") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- the simple-signing payload -----------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    docker_reference: str
    manifest_digest: str
    optional: dict | None = field(default=None, hash=False)


def make_payload(docker_reference: str, manifest_digest: str,
                 optional: dict | None = None) -> bytes:
    """The payload bytes cosign writes: compact JSON, keys in cosign's (Go's) order.

    cosign's struct order (critical{identity, image, type}, optional) happens to be
    sorted; ``optional`` is null or an object, its keys sorted and its strings escaped as
    Go's encoder does, so the bytes equal cosign's (and skopeo's) for the same inputs.
    """
    from store.errors import ReferenceError_
    from store.reference import parse_reference

    if not isinstance(docker_reference, str) or not docker_reference:
        raise SigningError("payload docker-reference must be a non-empty string")
    try:
        parse_reference(docker_reference, default_tag=False)
    except ReferenceError_ as e:
        raise SigningError(f"payload docker-reference: {e}") from None
    try:
        validate_digest(manifest_digest)
    except DigestError as e:
        raise SigningError(f"payload manifest digest: {e}") from None
    if optional is not None:
        if not isinstance(optional, dict):
            raise SigningError("payload 'optional' must be None or a dict")
        _check_go_encodable(optional, "optional")
    critical = {
        "identity": {"docker-reference": docker_reference},
        "image": {"docker-manifest-digest": manifest_digest},
        "type": COSIGN_TYPE,
    }
    text = json.dumps({"critical": critical, "optional": optional}, separators=(",", ":"),
                      ensure_ascii=False, sort_keys=True)
    # Go's encoder escapes these for HTML safety; they can only occur inside strings.
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise SigningError("payload optional holds a string that is not valid Unicode") from None


def _check_go_encodable(value: object, path: str) -> None:
    """Values whose JSON text Go and Python write alike (floats are not among them)."""
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise SigningError(f"payload {path}: keys must be strings, not {k!r}")
            _check_go_encodable(v, f"{path}.{k}")
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_go_encodable(v, f"{path}[{i}]")
        return
    raise SigningError(f"payload {path}: {type(value).__name__} values are not supported "
                       "(use strings, integers, booleans, null, lists and objects)")


class _Duplicated(dict):
    """A JSON object in which some key occurred twice (the first such key is kept)."""

    duplicate: str = ""


def _pairs_hook(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    duplicate = None
    for k, v in pairs:
        if k in seen and duplicate is None:
            duplicate = k
        seen[k] = v
    if duplicate is None:
        return seen
    out = _Duplicated(seen)
    out.duplicate = duplicate
    return out


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_payload(raw: bytes) -> Payload:
    """Parse payload bytes as strictly as containers/image does; SigningError if refused.

    Exactly the keys critical/optional, critical.{identity,image,type},
    image.docker-manifest-digest, identity.docker-reference; no duplicates at those
    levels; strings where strings belong; ``optional`` null or an object whose
    ``creator`` is a string and ``timestamp`` an integer (other keys are ignored).
    """
    if not isinstance(raw, bytes | bytearray):
        raise SigningError("payload must be bytes")
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise SigningError(f"payload is {len(raw)} bytes, more than {MAX_PAYLOAD_BYTES}")
    try:
        doc = json.loads(bytes(raw).decode("utf-8"), object_pairs_hook=_pairs_hook,
                         parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise SigningError("payload is not UTF-8 JSON") from None
    except ValueError as e:
        raise SigningError(f"payload is not valid JSON: {e}") from None
    except RecursionError:
        raise SigningError("payload is JSON nested too deeply") from None
    top = _exact_object(doc, ("critical", "optional"), "payload")
    critical = _exact_object(top["critical"], ("identity", "image", "type"), "payload critical")
    optional = top["optional"]
    if optional is not None:
        _check_optional(optional)
    sig_type = critical["type"]
    if not isinstance(sig_type, str):
        raise SigningError("payload critical.type is not a string")
    if sig_type != COSIGN_TYPE:
        raise SigningError(f"payload type is {sig_type!r}, not {COSIGN_TYPE!r}")
    image = _exact_object(critical["image"], ("docker-manifest-digest",), "payload critical.image")
    digest = image["docker-manifest-digest"]
    if not isinstance(digest, str):
        raise SigningError("payload critical.image.docker-manifest-digest is not a string")
    try:
        validate_digest(digest)
    except DigestError as e:
        raise SigningError(f"payload manifest digest: {e}") from None
    identity = _exact_object(critical["identity"], ("docker-reference",),
                             "payload critical.identity")
    reference = identity["docker-reference"]
    if not isinstance(reference, str):
        raise SigningError("payload critical.identity.docker-reference is not a string")
    return Payload(reference, digest, None if optional is None else dict(optional))


def _exact_object(value: object, keys: tuple[str, ...], what: str) -> dict:
    if not isinstance(value, dict):
        raise SigningError(f"{what} is not a JSON object")
    if isinstance(value, _Duplicated):
        raise SigningError(f"{what} has the key {value.duplicate!r} twice")
    extra = sorted(set(value) - set(keys))
    if extra:
        raise SigningError(f"{what} has unknown key {extra[0]!r}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise SigningError(f"{what} lacks the key {missing[0]!r}")
    return value


def _check_optional(optional: object) -> None:
    if not isinstance(optional, dict):
        raise SigningError("payload optional is neither null nor a JSON object")
    if isinstance(optional, _Duplicated):
        raise SigningError(f"payload optional has the key {optional.duplicate!r} twice")
    if "creator" in optional and not isinstance(optional["creator"], str):
        raise SigningError("payload optional.creator is not a string")
    if "timestamp" in optional:
        ts = optional["timestamp"]
        if isinstance(ts, bool) or not isinstance(ts, int | float):
            raise SigningError("payload optional.timestamp is not a number")
        if isinstance(ts, float) and not ts.is_integer():
            raise SigningError("payload optional.timestamp is not an integer")
        if not _INT64[0] <= ts <= _INT64[1]:
            raise SigningError("payload optional.timestamp is out of range")


# --- signatures ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """One signature as found (untrusted): payload bytes, base64 signature, annotations."""

    payload: bytes
    signature: str
    annotations: dict = field(default_factory=dict, hash=False)
    media_type: str = SIMPLESIGNING_MEDIA_TYPE

    @classmethod
    def from_layer(cls, payload: bytes, annotations: dict | None,
                   media_type: str = SIMPLESIGNING_MEDIA_TYPE) -> Signature:
        """A ``.sig`` manifest layer: the blob is the payload, the annotation the signature."""
        annotations = dict(annotations or {})
        value = annotations.get(SIGNATURE_ANNOTATION, "")
        return cls(bytes(payload), value if isinstance(value, str) else "", annotations,
                   media_type)


def sign_payload(key: ec.EllipticCurvePrivateKey, payload: bytes) -> str:
    """Base64 of the ASN.1 DER ECDSA P-256/SHA-256 signature over ``payload`` as given."""
    _require_p256(key, "signing key")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise SigningError(f"payload is {len(payload)} bytes, more than {MAX_PAYLOAD_BYTES}")
    return _b64(key.sign(bytes(payload), ec.ECDSA(hashes.SHA256())))


def create_signature(key: ec.EllipticCurvePrivateKey, docker_reference: str,
                     manifest_digest: str, optional: dict | None = None) -> Signature:
    """make_payload + sign_payload, as a Signature ready to store."""
    payload = make_payload(docker_reference, manifest_digest, optional)
    sig = sign_payload(key, payload)
    return Signature(payload, sig, {SIGNATURE_ANNOTATION: sig})


def read_containers_signature(raw: bytes, *, where: str) -> Signature:
    """containers/image's on-disk form: ``\\x00sigstore-json\\n`` + JSON {mimeType, payload
    (base64), annotations}."""
    if len(raw) > MAX_CONTAINERS_SIGNATURE_BYTES:
        raise SigningError(f"{where}: signature file is larger than "
                           f"{MAX_CONTAINERS_SIGNATURE_BYTES} bytes")
    if not raw.startswith(CONTAINERS_SIGSTORE_PREFIX):
        if raw[:1] == b"\x00":
            fmt = raw[1:raw.find(b"\n", 1)][:40] if b"\n" in raw[:64] else b"?"
            raise SigningError(f"{where}: signature format {fmt.decode('ascii', 'replace')!r} "
                               "is not sigstore-json")
        raise SigningError(f"{where}: not a sigstore signature (a GPG simple signing one, or "
                           "not a signature)")
    try:
        doc = json.loads(raw[len(CONTAINERS_SIGSTORE_PREFIX):].decode("utf-8"),
                         parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SigningError(f"{where}: sigstore-json signature is not valid JSON") from None
    if not isinstance(doc, dict):
        raise SigningError(f"{where}: sigstore-json signature is not a JSON object")
    mime = doc.get("mimeType")
    if not isinstance(mime, str):
        raise SigningError(f"{where}: signature has no mimeType string")
    payload_b64 = doc.get("payload")
    if not isinstance(payload_b64, str):
        raise SigningError(f"{where}: signature has no payload string")
    try:
        payload = base64.b64decode(payload_b64, validate=True)
    except (binascii.Error, ValueError):
        raise SigningError(f"{where}: signature payload is not valid base64") from None
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
        raise SigningError(f"{where}: signature annotations are not a string map")
    return Signature.from_layer(payload, annotations, mime)


def containers_signature_bytes(signature: Signature) -> bytes:
    """The inverse of read_containers_signature."""
    annotations = dict(sorted({**signature.annotations,
                               SIGNATURE_ANNOTATION: signature.signature}.items()))
    body = {"mimeType": signature.media_type, "payload": _b64(signature.payload),
            "annotations": annotations}
    return CONTAINERS_SIGSTORE_PREFIX + json.dumps(body, separators=(",", ":")).encode()


# --- identity rules -----------------------------------------------------------------------
# (payload_reference, image_reference) -> bool. The payload reference is taken as written
# (no default tag); the image reference is what the user names, a missing tag meaning
# ``latest`` as in the docker transport. Unparsable references never match.


def _parse(text: str, *, default_tag: bool):
    from store.errors import ReferenceError_
    from store.reference import parse_reference

    try:
        return parse_reference(text, default_tag=default_tag)
    except (ReferenceError_, TypeError):
        return None


def _name_only(ref) -> bool:
    return ref.tag is None and ref.digest is None


def match_exact(payload_reference: str, image_reference: str) -> bool:
    """containers/image ``matchExact``: the same name, tag and digest, both tagged or pinned."""
    signed = _parse(payload_reference, default_tag=False)
    intended = _parse(image_reference, default_tag=True)
    if signed is None or intended is None or _name_only(signed) or _name_only(intended):
        return False
    return str(signed) == str(intended)


def match_repository(payload_reference: str, image_reference: str) -> bool:
    """containers/image ``matchRepository``: the same repository, whatever tag or digest."""
    signed = _parse(payload_reference, default_tag=False)
    intended = _parse(image_reference, default_tag=True)
    return signed is not None and intended is not None and signed.name == intended.name


def match_repo_digest_or_exact(payload_reference: str, image_reference: str) -> bool:
    """containers/image ``matchRepoDigestOrExact`` (policy.json's default), faithfully.

    An image named by tag needs exactly that reference signed; an image named by digest
    only needs its repository. A payload reference without tag or digest never matches:
    that is what cosign signs, which is why containers/image's own tests verify cosign
    signatures with matchRepository. kiln's own default is match_repo_or_exact.
    """
    signed = _parse(payload_reference, default_tag=False)
    intended = _parse(image_reference, default_tag=True)
    if signed is None or intended is None or _name_only(signed):
        return False
    if intended.tag is not None:
        return str(signed) == str(intended)
    if intended.digest is not None:
        return signed.name == intended.name
    return False


def match_repo_or_exact(payload_reference: str, image_reference: str) -> bool:
    """kiln's default for ``--verify-key``: a payload naming only a repository (as cosign and
    kiln sign) matches any tag or digest of that repository; one with a tag or digest is
    judged by match_repo_digest_or_exact."""
    signed = _parse(payload_reference, default_tag=False)
    if signed is not None and _name_only(signed):
        return match_repository(payload_reference, image_reference)
    return match_repo_digest_or_exact(payload_reference, image_reference)


@dataclass(frozen=True)
class ImageIdentity:
    """An identity check for verify_*: ``rule(payload_reference, image_reference)``, with a
    readable description for error messages."""

    image_reference: str
    rule: Callable[[str, str], bool] = match_repo_or_exact

    def __call__(self, payload_reference: str) -> bool:
        return self.rule(payload_reference, self.image_reference)

    def __str__(self) -> str:
        return f"image {self.image_reference} ({self.rule.__name__})"


# --- verification -------------------------------------------------------------------------


def verify_signature(signature: Signature, keys: Sequence[ec.EllipticCurvePublicKey], *,
                     manifest_digest: str, identity: Callable[[str], bool]) -> Payload:
    """The payload of ``signature`` if it holds for the manifest ``manifest_digest`` and the
    identity rule; otherwise SigningError saying which check failed."""
    if not keys:
        raise SigningError("no public keys to verify with")
    try:
        validate_digest(manifest_digest)
    except DigestError as e:
        raise SigningError(f"manifest digest to verify against: {e}") from None
    if signature.media_type != SIMPLESIGNING_MEDIA_TYPE:
        raise SigningError(f"not a simple-signing signature (media type "
                           f"{signature.media_type!r})")
    payload = signature.payload
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise SigningError(f"payload is {len(payload)} bytes, more than {MAX_PAYLOAD_BYTES}")
    sig_b64 = signature.signature
    if not isinstance(sig_b64, str) or not sig_b64:
        raise SigningError(f"no signature (annotation {SIGNATURE_ANNOTATION} missing or empty)")
    if len(sig_b64) > MAX_SIGNATURE_B64:
        raise SigningError(f"signature is {len(sig_b64)} characters of base64, more than "
                           f"{MAX_SIGNATURE_B64}")
    try:
        der = base64.b64decode(sig_b64, validate=True)
    except (binascii.Error, ValueError):
        raise SigningError("signature is not valid base64") from None
    try:
        decode_dss_signature(der)
    except ValueError:
        raise SigningError(f"signature is not an ASN.1 DER ECDSA signature ({len(der)} bytes "
                           "after base64; truncated or not ECDSA)") from None
    for key in keys:
        try:
            key.verify(der, bytes(payload), ec.ECDSA(hashes.SHA256()))
            break
        except InvalidSignature:
            continue
    else:
        which = "the public key" if len(keys) == 1 else f"any of the {len(keys)} public keys"
        raise SigningError(f"signature does not verify with {which} (wrong key, or the "
                           "payload or signature was altered)")
    try:
        parsed = parse_payload(payload)
    except SigningError as e:
        raise SigningError(f"signed payload refused: {e}") from None
    if parsed.manifest_digest != manifest_digest:
        raise SigningError(f"signature is for {parsed.manifest_digest} not {manifest_digest}")
    if not identity(parsed.docker_reference):
        what = str(identity) if isinstance(identity, ImageIdentity) else "this image"
        raise SigningError(f"signature identity {parsed.docker_reference!r} is not accepted "
                           f"for {what}")
    return parsed


def verify_any(signatures: Sequence[Signature], keys: Sequence[ec.EllipticCurvePublicKey], *,
               manifest_digest: str, identity: Callable[[str], bool]) -> Payload:
    """The payload of the first signature that holds; otherwise one SigningError listing
    why each failed (``reasons`` has them one by one)."""
    if not keys:
        raise SigningError("no public keys to verify with")
    if not signatures:
        raise SigningError(f"no signatures for {manifest_digest}")
    reasons = []
    for i, sig in enumerate(signatures, 1):
        try:
            return verify_signature(sig, keys, manifest_digest=manifest_digest,
                                    identity=identity)
        except SigningError as e:
            reasons.append(f"signature {i}: {e}")
    if len(reasons) == 1:
        raise SigningError(f"no valid signature for {manifest_digest}: {reasons[0]}", reasons)
    raise SigningError(f"none of the {len(reasons)} signatures for {manifest_digest} holds: "
                       + "; ".join(reasons), reasons)
