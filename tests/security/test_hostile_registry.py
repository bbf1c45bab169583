"""Issue 10, point 7 (registry part): JSON from a registry is untrusted.

Token responses, error bodies, manifests, indexes, configs and signature manifests
come from whoever answers. Nested 100,000 deep, or far too big, they are a clear
`kiln: error:` naming the URL (exit 125), never a RecursionError traceback.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile

import pytest

from tests.conftest import KilnCLI
from tests.registry.conftest import fault_proxy, registry  # noqa: F401
from tests.registry.faults import auth_loop, body
from tests.registry.servers import upload_image

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
NESTED_ARRAY = b"[" * 100_000 + b"]" * 100_000
NESTED_OBJECT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000


def assert_clear_error(p, *needles: str) -> None:
    assert p.returncode == 125, p.err
    lines = p.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error: "), p.err
    assert "Traceback" not in p.err and "RecursionError" not in p.err, p.err
    for needle in needles:
        assert needle in p.err, p.err


@pytest.fixture
def token_realm(fault_proxy):  # noqa: F811
    """Every /v2/ request asks for a Bearer token from the proxy's own /token: what the
    token endpoint answers is then up to the test."""
    realm = f"{fault_proxy.url}/token"
    fault_proxy.add(auth_loop(f'Bearer realm="{realm}",service="hostile"', path=r"^/v2/"))
    return realm


@pytest.mark.parametrize("doc", [NESTED_ARRAY, NESTED_OBJECT], ids=["array", "object"])
def test_a_deeply_nested_token_response(kiln, fault_proxy, token_realm, doc):  # noqa: F811
    fault_proxy.add(body(doc, path=r"^/token", times=None))
    p = kiln("pull", f"{fault_proxy.host}/x/y:1", check=False)
    assert_clear_error(p, "token", token_realm)


def test_a_huge_token_response(kiln, fault_proxy, token_realm):  # noqa: F811
    doc = b'{"token": "' + b"a" * (16 << 20) + b'"}'
    fault_proxy.add(body(doc, path=r"^/token", times=None))
    p = kiln("pull", f"{fault_proxy.host}/x/y:1", check=False)
    assert_clear_error(p, "token response is larger than", token_realm)


@pytest.mark.parametrize("code", [400, 403, 404])
def test_a_deeply_nested_error_body(kiln, fault_proxy, code):  # noqa: F811
    fault_proxy.add(body(NESTED_ARRAY, code=code, path="/manifests/", times=None))
    p = kiln("pull", f"{fault_proxy.host}/x/y:1", check=False)
    assert_clear_error(p, f"HTTP {code}", f"{fault_proxy.url}/v2/x/y/manifests/1")


def test_a_huge_error_body_with_control_characters_stays_one_line(kiln, fault_proxy):  # noqa: F811
    page = b"<html>\n<body>\x1b[2J" + b"x" * (32 << 20) + b"</body></html>"
    fault_proxy.add(body(page, code=400, content_type="text/html", path="/manifests/",
                         times=None))
    p = kiln("pull", f"{fault_proxy.host}/x/y:1", check=False)
    assert_clear_error(p, "HTTP 400", f"{fault_proxy.url}/v2/x/y/manifests/1")
    assert "\x1b" not in p.err and len(p.err) < 1000


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, OCI_INDEX])
@pytest.mark.parametrize("doc", [NESTED_ARRAY, NESTED_OBJECT], ids=["array", "object"])
def test_a_deeply_nested_manifest(kiln, fault_proxy, media_type, doc):  # noqa: F811
    fault_proxy.add(body(doc, content_type=media_type, path="/manifests/", times=None))
    p = kiln("pull", f"{fault_proxy.host}/x/y:1", check=False)
    assert_clear_error(p, "nested too deeply", f"{fault_proxy.url}/v2/x/y/manifests/1")


def small_layer() -> tuple[bytes, str]:
    """A gzip layer holding one file, and its diff_id."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("hello")
        info.size = 3
        t.addfile(info, io.BytesIO(b"hi\n"))
    tar = buf.getvalue()
    return gzip.compress(tar), "sha256:" + hashlib.sha256(tar).hexdigest()


def config_with(extra: bytes, diff_id: str) -> bytes:
    head = json.dumps({"architecture": "amd64", "os": "linux",
                       "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    return head[:-1] + b', "x": ' + extra + b"}"


@pytest.mark.parametrize("depth", [100_000, 900])
def test_a_deeply_nested_config(registry, tmp_path, depth):  # noqa: F811
    """100,000 levels break json.loads; 900 parse, but re-serializing the config later
    (inspect, a build FROM it) from a deeper stack would not: both are refused."""
    layer, diff_id = small_layer()
    config = config_with(b"[" * depth + b"]" * depth, diff_id)
    upload_image(registry, f"hostile/config{depth}", "1", config=config,
                 layers=[("application/vnd.oci.image.layer.v1.tar+gzip", layer)])
    kiln = KilnCLI(tmp_path / "root")
    p = kiln("pull", f"{registry.host}/hostile/config{depth}:1", check=False)
    assert_clear_error(p, "nested too deeply", "sha256:" + hashlib.sha256(config).hexdigest())
    assert kiln("images", "-q").out == ""


# ------------------------------------------------------------------ signatures


def _image_on(registry, repo: str) -> str:  # noqa: F811
    layer, diff_id = small_layer()
    config = config_with(b"1", diff_id)
    return upload_image(registry, repo, "1", config=config,
                        layers=[("application/vnd.oci.image.layer.v1.tar+gzip", layer)])


def test_a_deeply_nested_signature_manifest(registry, fault_proxy, tmp_path):  # noqa: F811
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    digest = _image_on(registry, "hostile/sigman")
    pub = tmp_path / "key.pub"
    pub.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    fault_proxy.add(body(NESTED_ARRAY, content_type=OCI_MANIFEST, path=r"\.sig$", times=None))
    kiln = KilnCLI(tmp_path / "root")
    p = kiln("pull", "--verify-key", str(pub), f"{fault_proxy.host}/hostile/sigman:1",
             check=False)
    assert_clear_error(p, "nested too deeply", f"sha256-{digest[7:]}.sig")


def test_a_signed_but_deeply_nested_payload(registry, tmp_path):  # noqa: F811
    """Even a payload that verifies with the trusted key is parsed safely."""
    import base64

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from registry_client.remote import RemoteRepository
    from registry_client.signatures import push_signatures
    from registry_client.transport import RegistryOptions
    from store.reference import parse_reference
    from store.signatures import StoredSignature

    digest = _image_on(registry, "hostile/payload")
    key = ec.generate_private_key(ec.SECP256R1())
    pub = tmp_path / "key.pub"
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    payload = b"[" * 20_000 + b"]" * 20_000  # under the 64 KiB payload cap
    signature = base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()
    ref = f"{registry.host}/hostile/payload:1"
    repo = RemoteRepository.for_reference(parse_reference(ref), RegistryOptions(
        env={"HOME": str(tmp_path / "home")}))
    try:
        push_signatures(repo, digest, [StoredSignature(payload, signature, {})])
    finally:
        repo.transport.close()
    kiln = KilnCLI(tmp_path / "root")
    p = kiln("pull", "--verify-key", str(pub), ref, check=False)
    assert_clear_error(p, "nested too deeply", digest)
    assert kiln("images", "-q").out == ""
