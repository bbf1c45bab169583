"""cosign-compatible signatures end to end: kiln key generate, sign, verify, push
--sign-key, pull/run/build --verify-key and policy files, against a real registry."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
import requests

from tests.conftest import KilnCLI
from tests.registry.faults import corrupt_body, oversize_manifest

PASSWORD = {"KILN_PASSWORD": "correct horse"}
SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
ANNOTATION = "dev.cosignproject.cosign/signature"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("keys")
    k = KilnCLI(base / "root")
    out = {}
    for name in ("good", "other"):
        k("key", "generate", "-o", str(base / name), env=PASSWORD)
        out[name] = base / f"{name}.key"
        out[name + "_pub"] = base / f"{name}.pub"
    return out


@pytest.fixture
def kiln(tmp_path, busybox_rootfs) -> KilnCLI:
    k = KilnCLI(tmp_path / "kiln-root")
    k("import", str(busybox_rootfs), "busybox:latest")
    return k


def sig_manifest(registry, repo: str, digest: str) -> dict:
    r = requests.get(f"{registry.url}/v2/{repo}/manifests/sha256-{digest[7:]}.sig",
                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
                     timeout=10)
    r.raise_for_status()
    return r.json()


def blob(registry, repo: str, digest: str) -> bytes:
    r = requests.get(f"{registry.url}/v2/{repo}/blobs/{digest}", timeout=10)
    r.raise_for_status()
    return r.content


def put_manifest(registry, repo: str, ref: str, doc: dict) -> None:
    r = requests.put(f"{registry.url}/v2/{repo}/manifests/{ref}", data=json.dumps(doc),
                     headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
                     timeout=10)
    r.raise_for_status()


def test_key_files_are_cosign_format(keys):
    key = keys["good"].read_text()
    assert key.startswith("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----")
    assert keys["good"].stat().st_mode & 0o777 == 0o600
    assert keys["good_pub"].read_text().startswith("-----BEGIN PUBLIC KEY-----")


def test_sign_and_verify_locally_and_signatures_travel_with_save_and_load(kiln, keys,
                                                                          tmp_path):
    unsigned = kiln("verify", "busybox:latest", "--key", str(keys["good_pub"]), check=False)
    assert unsigned.returncode == 125 and "no signature" in unsigned.err.lower()
    kiln("sign", "busybox:latest", "--key", str(keys["good"]), env=PASSWORD)
    ok = kiln("verify", "busybox:latest", "--key", str(keys["good_pub"]))
    assert "docker.io/library/busybox" in ok.out and "blobs:" in ok.out
    wrong = kiln("verify", "busybox:latest", "--key", str(keys["other_pub"]), check=False)
    assert wrong.returncode == 125
    assert "sha256-" not in kiln("images").out  # signatures are not listed as images
    bad_pw = kiln("sign", "busybox:latest", "--key", str(keys["good"]),
                  env={"KILN_PASSWORD": "nope"}, check=False)
    assert bad_pw.returncode == 125 and "password" in bad_pw.err
    # an archive holds the image alone (podman load refuses several), unless asked
    plain, signed = tmp_path / "bb.tar", tmp_path / "bb-signed.tar"
    kiln("save", "-q", "busybox:latest", "-o", str(plain))
    kiln("save", "-q", "--include-signatures", "busybox:latest", "-o", str(signed))
    other = KilnCLI(tmp_path / "other-root")
    other("load", "-q", "-i", str(plain))
    p = other("verify", "busybox:latest", "--key", str(keys["good_pub"]), check=False)
    assert p.returncode == 125 and "no signature" in p.err.lower()
    other("load", "-q", "-i", str(signed))
    other("verify", "busybox:latest", "--key", str(keys["good_pub"]))


def test_verify_finds_a_damaged_layer(kiln, keys):
    from store.store import Store

    kiln("sign", "busybox:latest", "--key", str(keys["good"]), env=PASSWORD)
    store = Store(kiln.root)
    layer = store.image("busybox:latest").layers()[0]
    path = store.layout.blob_path(layer.digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    p = kiln("verify", "busybox:latest", "--key", str(keys["good_pub"]), check=False)
    assert p.returncode == 125 and layer.digest in p.err


def test_push_sign_then_pull_verify_and_run(kiln, keys, registry, tmp_path):
    ref = f"{registry.host}/signed/app:1"
    digest = kiln("push", "-q", "--sign-key", str(keys["good"]), "busybox:latest", ref,
                  env=PASSWORD).out.strip()
    sig = sig_manifest(registry, "signed/app", digest)
    (layer,) = sig["layers"]
    assert layer["mediaType"] == SIMPLESIGNING
    payload = blob(registry, "signed/app", layer["digest"])
    doc = json.loads(payload)
    assert set(doc) == {"critical", "optional"}
    assert doc["critical"] == {"identity": {"docker-reference": f"{registry.host}/signed/app"},
                               "image": {"docker-manifest-digest": digest},
                               "type": "cosign container image signature"}
    # an independent implementation agrees: openssl on the stored payload and signature
    (tmp_path / "payload").write_bytes(payload)
    (tmp_path / "sig.der").write_bytes(base64.b64decode(layer["annotations"][ANNOTATION]))
    v = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(keys["good_pub"]),
                        "-signature", str(tmp_path / "sig.der"), str(tmp_path / "payload")],
                       capture_output=True, text=True)
    assert v.stdout.strip() == "Verified OK", v.stderr
    config = json.loads(blob(registry, "signed/app", sig["config"]["digest"]))
    assert config["rootfs"]["diff_ids"] == [layer["digest"]]

    # a second signature is appended, not replacing the first
    kiln("sign", f"docker://{ref}", "--key", str(keys["other"]), env=PASSWORD)
    assert len(sig_manifest(registry, "signed/app", digest)["layers"]) == 2

    puller = KilnCLI(tmp_path / "puller")
    puller("pull", "-q", "--verify-key", str(keys["good_pub"]), ref)
    puller("verify", ref, "--key", str(keys["good_pub"]))  # the signatures came along
    puller("verify", ref, "--key", str(keys["other_pub"]))
    runner = KilnCLI(tmp_path / "runner")
    p = runner("run", "--rm", "--verify-key", str(keys["good_pub"]), ref, "echo", "trusted")
    assert p.out == "trusted\n"
    remote = KilnCLI(tmp_path / "remote")("verify", f"docker://{ref}", "--key",
                                          str(keys["good_pub"]))
    assert "signed:" in remote.out


def _no_layer_fetched(proxy, kiln_store_root: Path) -> None:
    assert not [r for r in proxy.requests if r["method"] == "GET" and "/blobs/" in r["path"]
                and "sig" not in r["path"] and r.get("fault") is None
                and int(r["headers"].get("Content-Length", "0") or 0) > 1 << 20]
    blobs = kiln_store_root / "blobs" / "sha256"
    assert not blobs.exists() or len(list(blobs.iterdir())) == 0


def test_pull_refuses_unsigned_and_wrongly_signed_before_any_layer(kiln, keys, registry,
                                                                    fault_proxy, tmp_path):
    kiln("push", "-q", "busybox:latest", f"{registry.host}/unsigned/app:1")
    kiln("push", "-q", "--sign-key", str(keys["other"]), "busybox:latest",
         f"{registry.host}/othersigned/app:1", env=PASSWORD)
    for repo, why in (("unsigned/app", "no signatures"), ("othersigned/app", "")):
        fault_proxy.requests.clear()
        fresh = KilnCLI(tmp_path / repo.replace("/", "-"))
        p = fresh("pull", "-q", "--verify-key", str(keys["good_pub"]),
                  f"{fault_proxy.host}/{repo}:1", check=False)
        assert p.returncode == 125, p.err
        assert "no valid signature" in p.err and why in p.err.lower()
        layer_gets = [r for r in fault_proxy.requests if r["method"] == "GET"
                      and "/blobs/" in r["path"]]
        image_layer = kiln_layer_digest(kiln)
        assert not [r for r in layer_gets if image_layer in r["path"]]
        assert fresh("images", "-q").out == ""


def kiln_layer_digest(kiln: KilnCLI) -> str:
    from store.store import Store

    return Store(kiln.root).image("busybox:latest").layers()[0].digest


def test_signature_for_another_digest_or_reference_is_refused(kiln, keys, registry, tmp_path):
    a = kiln("push", "-q", "--sign-key", str(keys["good"]), "busybox:latest",
             f"{registry.host}/sigs/a:1", env=PASSWORD).out.strip()
    # another image (gzip: another manifest digest) in the same repository, given a's
    # signature manifest as its own
    b = kiln("push", "-q", "--compression-format", "gzip", "busybox:latest",
             f"{registry.host}/sigs/a:gz").out.strip()
    assert a != b
    put_manifest(registry, "sigs/a", f"sha256-{b[7:]}.sig", sig_manifest(registry, "sigs/a", a))
    p = KilnCLI(tmp_path / "x")("pull", "-q", "--verify-key", str(keys["good_pub"]),
                                f"{registry.host}/sigs/a:gz", check=False)
    assert p.returncode == 125 and a in p.err and "no valid signature" in p.err
    # the same image and signature under another repository: the identity does not match
    kiln("push", "-q", "busybox:latest", f"{registry.host}/sigs/elsewhere:1")
    put_manifest(registry, "sigs/elsewhere", f"sha256-{a[7:]}.sig",
                 _with_blobs_copied(registry, "sigs/a", "sigs/elsewhere",
                                    sig_manifest(registry, "sigs/a", a)))
    p = KilnCLI(tmp_path / "y")("pull", "-q", "--verify-key", str(keys["good_pub"]),
                                f"{registry.host}/sigs/elsewhere:1", check=False)
    assert p.returncode == 125 and "sigs/a" in p.err


def _with_blobs_copied(registry, src: str, dst: str, manifest: dict) -> dict:
    for d in [manifest["config"]] + manifest["layers"]:
        data = blob(registry, src, d["digest"])
        r = requests.post(f"{registry.url}/v2/{dst}/blobs/uploads/", timeout=10)
        loc = r.headers["Location"]
        loc = loc if "://" in loc else registry.url + loc
        requests.put(loc + ("&" if "?" in loc else "?") + "digest=" + d["digest"], data=data,
                     timeout=10).raise_for_status()
    return manifest


@pytest.mark.parametrize("damage", ["truncated", "not-base64"])
def test_a_broken_signature_is_refused(kiln, keys, registry, tmp_path, damage):
    repo = f"broken-{damage}/app"
    digest = kiln("push", "-q", "--sign-key", str(keys["good"]), "busybox:latest",
                  f"{registry.host}/{repo}:1", env=PASSWORD).out.strip()
    sig = sig_manifest(registry, repo, digest)
    value = sig["layers"][0]["annotations"][ANNOTATION]
    sig["layers"][0]["annotations"][ANNOTATION] = (value[: len(value) // 2]
                                                   if damage == "truncated" else "!!" + value)
    put_manifest(registry, repo, f"sha256-{digest[7:]}.sig", sig)
    p = KilnCLI(tmp_path / "p")("pull", "-q", "--verify-key", str(keys["good_pub"]),
                                f"{registry.host}/{repo}:1", check=False)
    assert p.returncode == 125 and "no valid signature" in p.err


def test_tampered_manifest_config_payload_and_oversized_signature(kiln, keys, registry,
                                                                   fault_proxy, tmp_path):
    ref = f"{fault_proxy.host}/tamper/app:1"  # signed under the name it is pulled by
    digest = kiln("push", "-q", "--sign-key", str(keys["good"]), "busybox:latest", ref,
                  env=PASSWORD).out.strip()
    pub = str(keys["good_pub"])
    sig = sig_manifest(registry, "tamper/app", digest)
    from store.store import Store

    config_digest = Store(kiln.root).image("busybox:latest").config_descriptor().digest
    cases = {
        "manifest": (corrupt_body(path=r"/manifests/1$"), "Docker-Content-Digest"),
        "config": (corrupt_body(path=config_digest), config_digest),
        "payload": (corrupt_body(path=sig["layers"][0]["digest"]), "does not match"),
        "oversized": (oversize_manifest(4 * 1024 * 1024 + 10, path=r"\.sig$"), "larger than"),
    }
    for what, (fault, message) in cases.items():
        fault_proxy.clear()
        fault_proxy.add(fault)
        fresh = KilnCLI(tmp_path / what)
        p = fresh("pull", "-q", "--verify-key", pub, ref, check=False)
        assert p.returncode == 125 and message in p.err, (what, p.err)
        assert "Traceback" not in p.err
        assert fresh("images", "-q").out == "", what
    fault_proxy.clear()
    KilnCLI(tmp_path / "clean")("pull", "-q", "--verify-key", pub, ref)


def test_policy_file(kiln, keys, registry, tmp_path):
    ref = f"{registry.host}/policy/app:1"
    kiln("push", "-q", "--sign-key", str(keys["good"]), "busybox:latest", ref, env=PASSWORD)
    kiln("push", "-q", "busybox:latest", f"{registry.host}/policy/open:1")
    kiln("push", "-q", "busybox:latest", f"{registry.host}/unsigned/other:1")
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({
        "default": [{"type": "reject"}],
        "transports": {"docker": {
            f"{registry.host}/policy/app": [{
                "type": "sigstoreSigned", "keyPath": str(keys["good_pub"]),
                # cosign (and kiln) sign the bare repository: containers/image's
                # matchRepoDigestOrExact would refuse that for a tag, matchRepository not
                "signedIdentity": {"type": "matchRepository"}}],
            f"{registry.host}/policy/open": [{"type": "insecureAcceptAnything"}],
        }}}))
    k = KilnCLI(tmp_path / "k")
    k("pull", "-q", "--signature-policy", str(policy), ref)
    k("pull", "-q", "--signature-policy", str(policy), f"{registry.host}/policy/open:1")
    p = k("pull", "-q", "--signature-policy", str(policy), f"{registry.host}/unsigned/other:1",
          check=False)
    assert p.returncode == 125 and "reject" in p.err


def test_build_verifies_its_base_and_signs_its_result(kiln, keys, registry, tmp_path):
    base = f"{registry.host}/build/base:1"
    kiln("push", "-q", "--sign-key", str(keys["good"]), "busybox:latest", base, env=PASSWORD)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(f"FROM {base}\nRUN echo hi > /f\n")
    b = KilnCLI(tmp_path / "builder")
    b("build", "-q", "--verify-key", str(keys["good_pub"]), "--sign-key", str(keys["good"]),
      "-t", "localhost/built:1", str(ctx), env=PASSWORD)
    b("verify", "localhost/built:1", "--key", str(keys["good_pub"]))
    refused = KilnCLI(tmp_path / "refused")
    p = refused("build", "-q", "--verify-key", str(keys["other_pub"]), "-t", "x", str(ctx),
                check=False)
    assert p.returncode == 125 and "no valid signature" in p.err


@pytest.mark.interop
def test_skopeo_with_sigstore_accepts_kiln_signatures(kiln, keys, registry, tmp_path):
    """containers/image as the independent verifier, where its sigstore support is built
    in (Debian's skopeo is built without: then this test says so and skips)."""
    from tests.interop.conftest import require_tool

    skopeo = require_tool("skopeo")
    ref = f"{registry.host}/skopeo/signed:1"
    kiln("push", "-q", "--sign-key", str(keys["good"]), "busybox:latest", ref, env=PASSWORD)
    kiln("push", "-q", "busybox:latest", f"{registry.host}/skopeo/unsigned:1")
    regd = tmp_path / "registries.d"
    regd.mkdir()
    (regd / "kiln.yaml").write_text(f"docker:\n  {registry.host}:\n"
                                    "    use-sigstore-attachments: true\n")
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{
        "type": "sigstoreSigned", "keyPath": str(keys["good_pub"]),
        "signedIdentity": {"type": "matchRepository"}}]}))

    def copy(name: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [skopeo, "copy", "--registries.d", str(regd), "--policy", str(policy),
             "--src-tls-verify=false", f"docker://{name}", f"oci:{tmp_path / 'out'}:x"],
            capture_output=True, text=True, timeout=120)

    signed = copy(ref)
    if "sigstore disabled" in signed.stderr:
        pytest.skip("!!! this skopeo is built without sigstore support (Debian's is): the "
                    "containers/image cross-check of kiln signatures did NOT run !!!")
    assert signed.returncode == 0, signed.stderr
    unsigned = copy(f"{registry.host}/skopeo/unsigned:1")
    assert unsigned.returncode != 0 and "signature" in unsigned.stderr
