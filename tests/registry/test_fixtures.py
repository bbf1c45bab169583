"""The registry fixtures and the fault proxy, checked with independent clients
(skopeo, requests), so a failing client test points at the client, not at these."""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.registry.faults import (
    BlobHost,
    FaultProxy,
    auth_loop,
    bearer_challenge,
    corrupt_body,
    drop_after,
    lie_content_length,
    oversize_manifest,
    redirect_to,
    slow_drip,
    status,
)
from tests.registry.servers import RegistryServer, clean_env, sha256_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


# --------------------------------------------------------------------------- helpers


@dataclass
class Layout:
    path: Path
    tag: str
    manifest: bytes
    config: bytes
    layer: bytes

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def layer_digest(self) -> str:
        return sha256_digest(self.layer)


def write_oci_layout(path: Path, tag: str = "v1", payload_size: int = 256 * 1024) -> Layout:
    """A one-layer OCI image layout; the layer holds incompressible bytes, so the blob is
    about payload_size long (big enough to cut in the middle)."""
    payload = random.Random(5).randbytes(payload_size)
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("payload.bin")
        info.size, info.mode, info.mtime = len(payload), 0o644, 0
        tar.addfile(info, io.BytesIO(payload))
    layer_tar = tar_buf.getvalue()
    layer = gzip.compress(layer_tar, mtime=0)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [sha256_digest(layer_tar)]}},
                        sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256_digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256_digest(layer), "size": len(layer)}]}).encode()
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for blob in (layer, config, manifest):
        (blobs / hashlib.sha256(blob).hexdigest()).write_bytes(blob)
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (path / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha256_digest(manifest),
                       "size": len(manifest),
                       "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return Layout(path, tag, manifest, config, layer)


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    return write_oci_layout(tmp_path_factory.mktemp("layout") / "oci")


@pytest.fixture
def http() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxies from the environment: loopback only
    return session


@functools.cache
def _private_var_lib_containers() -> list[str]:
    """A command prefix giving skopeo a throwaway /var/lib/containers: as root it keeps its
    blob-info cache there, which must neither be written by tests nor leak between
    registries that happen to reuse a port. [] where a mount namespace is not allowed."""
    if os.geteuid() != 0 or not Path("/var/lib/containers").is_dir():
        return []
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              'mount -t tmpfs kiln-skopeo /var/lib/containers && exec "$@"', "sh"]
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return prefix if ok else []


def skopeo(*args: str, tmp: Path, check: bool = True) -> subprocess.CompletedProcess:
    auth = tmp / "skopeo-auth.json"
    if not auth.exists():
        auth.write_text("{}")
    env = {**clean_env(), "REGISTRY_AUTH_FILE": str(auth)}
    p = subprocess.run([*_private_var_lib_containers(), "skopeo", "--insecure-policy", *args],
                       capture_output=True, text=True, env=env, timeout=60)
    if check and p.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)} failed:\n{p.stderr}")
    return p


def push(layout: Layout, host: str, repo: str, tmp: Path, *extra: str, check: bool = True):
    return skopeo("copy", "--retry-times", "0", *extra, f"oci:{layout.path}:{layout.tag}",
                  f"docker://{host}/{repo}:{layout.tag}", tmp=tmp, check=check)


def get_manifest(http: requests.Session, registry: RegistryServer, repo: str, ref: str,
                 **kwargs) -> requests.Response:
    return http.get(f"{registry.url}/v2/{repo}/manifests/{ref}",
                    headers={"Accept": OCI_MANIFEST, **kwargs.pop("headers", {})}, **kwargs)


def upload_blob(http: requests.Session, base_url: str, repo: str, data: bytes,
                chunked: bool = False) -> requests.Response:
    """POST + PATCH (+ PUT), or POST + monolithic PUT; returns the final response."""
    r = http.post(f"{base_url}/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, r.text
    location = r.headers["Location"]
    digest = sha256_digest(data)
    if chunked:
        r = http.patch(location, data=iter([data[:1000], data[1000:]]),  # a generator: chunked
                       headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 202, r.text
        location = r.headers["Location"]
        body = b""
    else:
        body = data
    sep = "&" if "?" in location else "?"
    return http.put(f"{location}{sep}digest={digest}", data=body,
                    headers={"Content-Type": "application/octet-stream"})


# --------------------------------------------------------------------------- registries


def test_plain_registry_takes_a_skopeo_push(registry, layout, http, tmp_path):
    assert registry.startup_seconds < 10
    push(layout, registry.host, "plain/app", tmp_path, "--dest-tls-verify=false")

    r = get_manifest(http, registry, "plain/app", layout.tag)
    assert r.status_code == 200
    assert r.headers["Docker-Content-Digest"] == layout.manifest_digest
    assert sha256_digest(r.content) == layout.manifest_digest
    blob = http.get(f"{registry.url}/v2/plain/app/blobs/{layout.layer_digest}")
    assert blob.content == layout.layer
    assert registry.blob_path(layout.layer_digest).read_bytes() == layout.layer
    ranged = http.get(f"{registry.url}/v2/plain/app/blobs/{layout.layer_digest}",
                      headers={"Range": "bytes=100-199"})
    assert ranged.status_code == 206 and ranged.content == layout.layer[100:200]

    inspect = skopeo("inspect", "--tls-verify=false", "--raw",
                     f"docker://{registry.host}/plain/app:{layout.tag}", tmp=tmp_path)
    assert inspect.stdout.encode() == layout.manifest

    deleted = http.delete(f"{registry.url}/v2/plain/app/manifests/{layout.manifest_digest}")
    assert deleted.status_code == 202
    assert get_manifest(http, registry, "plain/app", layout.tag).status_code == 404


def test_fresh_registry_is_empty_and_separate(fresh_registry, registry, http):
    assert fresh_registry.host != registry.host
    assert http.get(f"{fresh_registry.url}/v2/_catalog").json() == {"repositories": []}


def test_basic_registry_needs_alice(basic_registry, layout, http, tmp_path):
    host = basic_registry.host
    anon = push(layout, host, "basic/app", tmp_path, "--dest-tls-verify=false", check=False)
    assert anon.returncode != 0
    assert "authentication required" in anon.stderr or "unauthorized" in anon.stderr.lower()
    wrong = push(layout, host, "basic/app", tmp_path, "--dest-tls-verify=false",
                 "--dest-creds", "alice:not-it", check=False)
    assert wrong.returncode != 0

    push(layout, host, "basic/app", tmp_path, "--dest-tls-verify=false",
         "--dest-creds", "alice:wonderland")
    r = http.get(f"{basic_registry.url}/v2/basic/app/tags/list")
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Basic realm=")
    r = http.get(f"{basic_registry.url}/v2/basic/app/tags/list", auth=("alice", "wonderland"))
    assert r.json() == {"name": "basic/app", "tags": [layout.tag]}


def test_token_registry_with_skopeo(token_registry, layout, tmp_path):
    ts = token_registry.token_server
    host = token_registry.host
    push(layout, host, "tok/app", tmp_path, "--dest-tls-verify=false",
         "--dest-creds", "alice:wonderland")
    scoped = [r for r in ts.requests if "repository:tok/app:pull,push" in str(r["query"])]
    assert scoped, ts.requests
    assert scoped[0]["headers"]["Authorization"].startswith("Basic ")
    assert scoped[0]["query"]["service"] == [ts.service]

    # bob may pull, but not push, a repository in denied_repos
    push(layout, host, "denied/app", tmp_path, "--dest-tls-verify=false",
         "--dest-creds", "alice:wonderland")
    refused = push(layout, host, "denied/app", tmp_path, "--dest-tls-verify=false",
                   "--dest-creds", "bob:builder", check=False)
    assert refused.returncode != 0
    assert "denied" in refused.stderr.lower() or "unauthorized" in refused.stderr.lower()
    pulled = skopeo("inspect", "--raw", "--tls-verify=false", "--creds", "bob:builder",
                    f"docker://{host}/denied/app:{layout.tag}", tmp=tmp_path)
    assert pulled.stdout.encode() == layout.manifest
    push(layout, host, "bob/app", tmp_path, "--dest-tls-verify=false",
         "--dest-creds", "bob:builder")


def _token(http, ts, scope, auth=None) -> requests.Response:
    return http.get(ts.url, params={"service": ts.service, "scope": scope}, auth=auth)


def test_token_server_knobs(token_registry, http):
    ts = token_registry.token_server
    base = token_registry.url
    assert http.get(f"{base}/v2/").headers["WWW-Authenticate"] == (
        f'Bearer realm="{ts.url}",service="{ts.service}"')

    assert _token(http, ts, "repository:knobs/app:pull", ("alice", "nope")).status_code == 401
    assert _token(http, ts, "repository:knobs/app:pull").status_code == 401  # no anonymous

    ts.token_key = "access_token"
    ts.expires_in = 42
    body = _token(http, ts, "repository:knobs/app:pull,push", ("alice", "wonderland")).json()
    assert "token" not in body and body["expires_in"] == 42
    bearer = {"Authorization": "Bearer " + body["access_token"]}
    r = http.post(f"{base}/v2/knobs/app/blobs/uploads/", headers=bearer)
    assert r.status_code == 202
    ts.token_key = "both"
    body = _token(http, ts, "repository:knobs/app:pull", ("alice", "wonderland")).json()
    assert body["token"] == body["access_token"]

    # OAuth2 password grant
    r = http.post(ts.url, data={"grant_type": "password", "username": "bob",
                                "password": "builder", "service": ts.service,
                                "scope": "repository:knobs/app:pull", "client_id": "kiln"})
    assert r.status_code == 200 and r.json()["access_token"]

    ts.anonymous_pull = True
    anon = _token(http, ts, "repository:knobs/app:pull,push").json()["token"]
    assert ts.issued[-1]["access"] == [{"type": "repository", "name": "knobs/app",
                                        "actions": ["pull"]}]
    r = http.get(f"{base}/v2/knobs/app/tags/list", headers={"Authorization": f"Bearer {anon}"})
    assert r.status_code == 404  # authorized; the repository just has no tags yet
    r = http.post(f"{base}/v2/knobs/app/blobs/uploads/",
                  headers={"Authorization": f"Bearer {anon}"})
    assert r.status_code == 401
    assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]

    expired = ts.make_token("alice", [{"type": "repository", "name": "knobs/app",
                                       "actions": ["pull"]}], expires_in=-120)
    r = http.get(f"{base}/v2/knobs/app/tags/list",
                 headers={"Authorization": f"Bearer {expired}"})
    assert r.status_code == 401


def test_token_registry_rejects_a_forged_token(token_registry, http):
    ts = token_registry.token_server
    good = ts.make_token("alice", [{"type": "repository", "name": "forged/app",
                                    "actions": ["pull"]}])
    header, claims, sig = good.split(".")
    payload = json.loads(base64.urlsafe_b64decode(claims + "=="))
    payload["access"][0]["name"] = "other/app"
    forged = ".".join([header, base64.urlsafe_b64encode(json.dumps(payload).encode())
                       .rstrip(b"=").decode(), sig])
    base = token_registry.url
    r = http.get(f"{base}/v2/forged/app/tags/list", headers={"Authorization": f"Bearer {good}"})
    assert r.status_code == 404  # accepted; no such repository yet
    r = http.get(f"{base}/v2/other/app/tags/list", headers={"Authorization": f"Bearer {forged}"})
    assert r.status_code == 401


def test_token_registry_state_is_reset_between_tests(token_registry):
    ts = token_registry.token_server
    assert ts.token_key == "token" and ts.expires_in == 300 and not ts.anonymous_pull
    assert ts.requests == [] and "denied/app" in ts.denied_repos


def test_tls_registry_needs_its_ca(tls_registry, layout, http, tmp_path):
    assert tls_registry.url.startswith("https://")
    cert_dir = tls_registry.certs_d / tls_registry.host
    assert (cert_dir / "ca.crt").read_bytes() == tls_registry.ca_pem.read_bytes()
    untrusted = push(layout, tls_registry.host, "tls/app", tmp_path, check=False)
    assert untrusted.returncode != 0
    assert "x509" in untrusted.stderr or "certificate" in untrusted.stderr

    push(layout, tls_registry.host, "tls/app", tmp_path, "--dest-cert-dir", str(cert_dir))
    with pytest.raises(requests.exceptions.SSLError):
        http.get(f"{tls_registry.url}/v2/")
    r = get_manifest(http, tls_registry, "tls/app", layout.tag, verify=str(tls_registry.ca_pem))
    assert r.headers["Docker-Content-Digest"] == layout.manifest_digest


# --------------------------------------------------------------------------- fault proxy


@pytest.fixture(scope="module")
def pushed(registry, layout, tmp_path_factory) -> str:
    """The layout pushed to the module's plain registry as faults/app; returns the repo."""
    push(layout, registry.host, "faults/app", tmp_path_factory.mktemp("skopeo"),
         "--dest-tls-verify=false")
    return "faults/app"


def blob_url(base: str, repo: str, layout: Layout) -> str:
    return f"{base}/v2/{repo}/blobs/{layout.layer_digest}"


def test_proxy_forwards_uploads_and_rewrites_location(fault_proxy, registry, http):
    data = random.Random(1).randbytes(50_000)
    r = http.post(f"{fault_proxy.url}/v2/proxy/up/blobs/uploads/")
    assert r.headers["Location"].startswith(fault_proxy.url + "/v2/proxy/up/blobs/uploads/")
    http.delete(r.headers["Location"])

    for chunked, payload in ((True, data), (False, data[::-1])):
        r = upload_blob(http, fault_proxy.url, "proxy/up", payload, chunked=chunked)
        assert r.status_code == 201, r.text
        assert r.headers["Location"].startswith(fault_proxy.url)
        got = http.get(f"{registry.url}/v2/proxy/up/blobs/{sha256_digest(payload)}")
        assert got.content == payload
    patches = [q for q in fault_proxy.requests if q["method"] == "PATCH"]
    assert patches and patches[0]["headers"]["Transfer-Encoding"] == "chunked"
    head = http.head(f"{fault_proxy.url}/v2/proxy/up/blobs/{sha256_digest(data)}")
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(data)
    assert {q["method"] for q in fault_proxy.requests} == {"POST", "PATCH", "PUT", "DELETE",
                                                           "HEAD"}
    assert all(q["fault"] is None for q in fault_proxy.requests)


def test_skopeo_push_and_pull_through_the_proxy(fault_proxy, registry, layout, http, tmp_path):
    push(layout, fault_proxy.host, "proxy/skopeo", tmp_path, "--dest-tls-verify=false")
    assert get_manifest(http, registry, "proxy/skopeo", layout.tag).content == layout.manifest
    out = tmp_path / "pulled"
    skopeo("copy", "--src-tls-verify=false", f"docker://{fault_proxy.host}/proxy/skopeo:v1",
           f"oci:{out}:v1", tmp=tmp_path)
    assert (out / "blobs" / "sha256" / layout.layer_digest[7:]).read_bytes() == layout.layer
    assert any(q["method"] == "PUT" and "/manifests/" in q["path"] for q in fault_proxy.requests)


def test_drop_after_then_range_completes_the_blob(fault_proxy, pushed, layout, http):
    fault = fault_proxy.add(drop_after(1000, path="/blobs/sha256:"))
    url = blob_url(fault_proxy.url, pushed, layout)
    got = b""
    r = http.get(url, stream=True)
    assert r.status_code == 200
    assert int(r.headers["Content-Length"]) == len(layout.layer)
    with pytest.raises(requests.exceptions.ChunkedEncodingError, match="IncompleteRead"):
        for piece in r.iter_content(100):  # divides 1000: the last full read ends at the cut
            got += piece
    assert len(got) == 1000 and fault.spent
    rest = http.get(url, headers={"Range": f"bytes={len(got)}-"})
    assert rest.status_code == 206
    size = len(layout.layer)
    assert rest.headers["Content-Range"] == f"bytes 1000-{size - 1}/{size}"
    assert sha256_digest(got + rest.content) == layout.layer_digest
    assert fault_proxy.requests[-1]["headers"]["Range"] == "bytes=1000-"


def test_status_burst_then_pass_through(fault_proxy, pushed, layout, http):
    fault_proxy.add(status(503, retry_after=1, times=2, path="/manifests/"))
    fault_proxy.add(status(429, retry_after="7", method="HEAD"))
    url = f"{fault_proxy.url}/v2/{pushed}/manifests/{layout.tag}"
    answers = [http.get(url, headers={"Accept": OCI_MANIFEST}) for _ in range(3)]
    assert [r.status_code for r in answers] == [503, 503, 200]
    assert answers[0].headers["Retry-After"] == "1"
    assert answers[0].json()["errors"][0]["code"] == "UNAVAILABLE"
    assert answers[2].content == layout.manifest
    head = http.head(blob_url(fault_proxy.url, pushed, layout))
    assert head.status_code == 429 and head.headers["Retry-After"] == "7"
    assert http.head(blob_url(fault_proxy.url, pushed, layout)).status_code == 200
    assert [q["fault"] for q in fault_proxy.requests] == ["status", "status", None,
                                                          "status", None]


def test_corrupt_body_flips_one_byte(fault_proxy, pushed, layout, http):
    fault_proxy.add(corrupt_body(path="/blobs/"))
    url = blob_url(fault_proxy.url, pushed, layout)
    bad = http.get(url).content
    assert len(bad) == len(layout.layer) and bad != layout.layer
    assert sum(a != b for a, b in zip(bad, layout.layer, strict=True)) == 1
    assert http.get(url).content == layout.layer


@pytest.mark.parametrize("delta", [+100, -10])
def test_lie_content_length(fault_proxy, pushed, layout, http, delta):
    fault_proxy.add(lie_content_length(delta, path="/blobs/"))
    url = blob_url(fault_proxy.url, pushed, layout)
    if delta > 0:
        with pytest.raises(requests.exceptions.RequestException):
            http.get(url)
    else:
        r = http.get(url)
        assert int(r.headers["Content-Length"]) == len(layout.layer) + delta
        assert r.content == layout.layer[:delta]
    assert http.get(url).content == layout.layer  # spent; a new connection works


def test_redirect_to_blob_host_drops_authorization(fault_proxy, registry, pushed, layout, http):
    with BlobHost(registry) as blobs:
        assert blobs.host.rpartition(":")[0] == "127.0.0.2"  # another host, not just a port
        fault_proxy.add(redirect_to(blobs.url))
        url = blob_url(fault_proxy.url, pushed, layout) + "?probe=1"
        r = http.get(url, headers={"Authorization": "Bearer secret-for-registry-only"})
        assert r.status_code == 200 and r.content == layout.layer
        assert r.history[0].status_code == 307
        assert r.history[0].headers["Location"] == blobs.url + url[len(fault_proxy.url):]
        assert fault_proxy.requests[0]["headers"]["Authorization"].endswith("registry-only")
        assert len(blobs.requests) == 1 and "Authorization" not in blobs.requests[0]["headers"]

        ranged = http.get(url, headers={"Range": "bytes=10-19"})
        assert ranged.status_code == 206 and ranged.content == layout.layer[10:20]
        missing = http.get(f"{blobs.url}/v2/x/blobs/sha256:{'0' * 64}")
        assert missing.status_code == 404


def test_auth_loop_basic_and_bearer(fault_proxy, token_registry, http):
    fault_proxy.add(auth_loop(times=2))
    for creds in (None, ("alice", "wonderland")):
        r = http.get(f"{fault_proxy.url}/v2/", auth=creds)
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"] == 'Basic realm="kiln-fault-proxy"'
    assert http.get(f"{fault_proxy.url}/v2/").status_code == 200

    ts = token_registry.token_server
    fault_proxy.add(auth_loop(bearer_challenge(ts, "repository:loop/app:pull")))
    token = _token(http, ts, "repository:loop/app:pull", ("alice", "wonderland")).json()["token"]
    r = http.get(f"{fault_proxy.url}/v2/loop/app/tags/list",
                 headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith(f'Bearer realm="{ts.url}"')


def test_oversize_manifest(fault_proxy, http):
    size = 5 * 1024 * 1024 + 3
    fault_proxy.add(oversize_manifest(size, times=2))
    url = f"{fault_proxy.url}/v2/big/app/manifests/v1"
    head = http.head(url)
    assert int(head.headers["Content-Length"]) == size
    r = http.get(url)
    assert len(r.content) == size
    assert r.headers["Content-Type"] == OCI_MANIFEST
    assert r.headers["Docker-Content-Digest"] == head.headers["Docker-Content-Digest"]
    assert r.headers["Docker-Content-Digest"] == sha256_digest(r.content)
    assert r.json()["schemaVersion"] == 2
    assert http.get(url).status_code == 404  # spent: the real registry has no such manifest


def test_slow_drip_trips_a_read_timeout_and_close_is_prompt(registry, pushed, layout, http):
    proxy = FaultProxy(registry)
    proxy.add(slow_drip(interval=0.5, chunk=100, path="/blobs/"))
    started = time.monotonic()
    got = b""
    r = http.get(blob_url(proxy.url, pushed, layout), stream=True, timeout=(2, 0.3))
    with pytest.raises(requests.exceptions.ConnectionError, match="timed out"):
        for piece in r.iter_content(50):
            got += piece
    assert 0 < len(got) < 1000 and time.monotonic() - started < 3
    closing = time.monotonic()
    proxy.close()
    assert time.monotonic() - closing < 2


def test_slow_drip_cuts_a_client_that_never_gives_up(fault_proxy, pushed, layout, http):
    fault_proxy.add(slow_drip(interval=0.05, chunk=100, path="/blobs/", give_up_after=0.5))
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        http.get(blob_url(fault_proxy.url, pushed, layout), timeout=5)  # each read succeeds
    assert 0.5 <= time.monotonic() - started < 3


def test_proxy_in_front_of_tls_registry(tls_registry, layout, http, tmp_path):
    push(layout, tls_registry.host, "tls/proxied", tmp_path, "--dest-cert-dir",
         str(tls_registry.certs_d / tls_registry.host))
    with FaultProxy(tls_registry) as proxy:
        assert proxy.url.startswith("http://")
        r = http.get(f"{proxy.url}/v2/tls/proxied/blobs/{layout.layer_digest}")
        assert r.content == layout.layer
        r = http.post(f"{proxy.url}/v2/tls/proxied/blobs/uploads/")
        assert r.headers["Location"].startswith(proxy.url + "/")


def test_fault_matching_and_clear(fault_proxy, http):
    only_head = fault_proxy.add(status(500, method="HEAD", path=r"^/v2/$", times=None))
    url = f"{fault_proxy.url}/v2/"
    assert http.get(url).status_code == 200
    assert [http.head(url).status_code for _ in range(3)] == [500, 500, 500]
    assert only_head.hits == 3 and not only_head.spent
    assert http.get(f"{fault_proxy.url}/v2/_catalog").status_code == 200
    fault_proxy.clear()
    assert http.head(url).status_code == 200


def test_proxy_answers_502_when_upstream_is_gone(http, tmp_path):
    from tests.registry.servers import start_registry

    reg = start_registry(tmp_path / "gone")
    with FaultProxy(reg) as proxy:
        assert http.get(f"{proxy.url}/v2/").status_code == 200
        reg.stop()
        assert http.get(f"{proxy.url}/v2/").status_code == 502


def test_a_registry_that_cannot_start_fails_with_its_log(tmp_path, monkeypatch):
    from tests.registry import servers

    def broken_config(port, storage, auth, tls):
        return {"version": 0.1, "storage": {"no-such-driver": {}},
                "http": {"addr": f"127.0.0.1:{port}"}}

    monkeypatch.setattr(servers, "_registry_config", broken_config)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="no-such-driver"):
        servers.start_registry(tmp_path / "broken")
    assert time.monotonic() - started < 5  # it noticed the exit, not the timeout
