"""Pull and push against a real CNCF distribution registry, with and without auth, TLS
and injected faults."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from registry_client.errors import AuthError, RegistryError
from registry_client.pull import pull
from registry_client.push import push
from registry_client.transport import RegistryOptions
from store.digest import sha256_digest
from store.errors import DigestError, KilnError
from store.store import Store
from tests.registry.faults import (
    FaultProxy,
    auth_loop,
    corrupt_body,
    drop_after,
    lie_content_length,
    oversize_manifest,
    redirect_to,
    slow_drip,
    status,
)

BLOB = r"/blobs/sha256:"


def options(tmp_path: Path, **kw) -> RegistryOptions:
    """Options that read no auth file of this machine's user."""
    env = {"HOME": str(tmp_path / "home"), "XDG_RUNTIME_DIR": str(tmp_path / "run"),
           "PATH": os.environ.get("PATH", "")}
    kw.setdefault("retry_budget", 20.0)
    return RegistryOptions(env=env, **kw)


def layer_blob(store: Store, name: str = "busybox:latest"):
    return store.image(name).layers()[0]


def fresh_store(tmp_path: Path, name: str = "pulled") -> Store:
    return Store(tmp_path / name)


def assert_nothing_stored(store: Store) -> None:
    assert store.tags() == []
    assert list(store.layout.blob_digests()) == []
    assert store.layer_diff_ids_on_disk() == []


def blob_gets(proxy: FaultProxy) -> list[dict]:
    return [r for r in proxy.requests if r["method"] == "GET" and BLOB in r["path"]]


# ------------------------------------------------------------------ round trips


def test_push_then_pull_gives_the_same_image_ready_to_run(busybox_store, registry, tmp_path):
    ref = f"{registry.host}/roundtrip/busybox:1"
    pushed = push(busybox_store, "busybox:latest", ref, options(tmp_path))
    assert pushed.digest == busybox_store.resolve("busybox:latest").digest

    other = fresh_store(tmp_path)
    desc = pull(other, ref, options(tmp_path))
    assert desc.digest == pushed.digest
    assert other.resolve(ref).digest == pushed.digest
    image = other.image(ref)
    assert image.config() == busybox_store.image("busybox:latest").config()
    for layer in image.layers():  # unpacked in the same pass: ready to run
        assert other.has_layer_dir(layer.diff_id)
        assert (other.layer_dir(layer.diff_id) / "bin" / "busybox").exists()


def test_pull_by_digest_keeps_a_pin_and_checks_the_digest(busybox_store, registry, tmp_path):
    ref = f"{registry.host}/bydigest/busybox:1"
    pushed = push(busybox_store, "busybox:latest", ref, options(tmp_path))
    other = fresh_store(tmp_path)
    pinned = f"{registry.host}/bydigest/busybox@{pushed.digest}"
    assert pull(other, pinned, options(tmp_path)).digest == pushed.digest
    assert other.resolve(pinned).digest == pushed.digest
    wrong = f"{registry.host}/bydigest/busybox@sha256:{'1' * 64}"
    with pytest.raises(RegistryError, match="404|manifest unknown|MANIFEST_UNKNOWN"):
        pull(fresh_store(tmp_path, "other"), wrong, options(tmp_path))


def test_second_pull_fetches_no_blob(busybox_store, registry, fault_proxy, tmp_path):
    ref = f"{registry.host}/again/busybox:1"
    push(busybox_store, "busybox:latest", ref, options(tmp_path))
    other = fresh_store(tmp_path)
    via = f"{fault_proxy.host}/again/busybox:1"
    pull(other, via, options(tmp_path))
    first = len(blob_gets(fault_proxy))
    assert first == 2  # the layer and the config
    fault_proxy.requests.clear()
    pull(other, via, options(tmp_path))
    assert blob_gets(fault_proxy) == [r for r in fault_proxy.requests
                                      if "blobs" in r["path"] and "config" in r["path"]] or \
        len(blob_gets(fault_proxy)) <= 1  # at most the small config again, never the layer
    layer = layer_blob(other, via)
    assert all(layer.digest not in r["path"] for r in blob_gets(fault_proxy))


def test_pull_of_a_missing_tag_names_the_url(registry, tmp_path):
    with pytest.raises(RegistryError) as e:
        pull(fresh_store(tmp_path), f"{registry.host}/nosuch/image:1", options(tmp_path))
    assert f"http://{registry.host}/v2/nosuch/image/manifests/1" in str(e.value)


# ------------------------------------------------------------------ push details


def test_chunked_upload_and_digestfile(busybox_store, registry, fault_proxy, tmp_path):
    opts = options(tmp_path, chunk_size=64 * 1024, stream_chunk_size=256 * 1024)
    digestfile = tmp_path / "digest"
    desc = push(busybox_store, "busybox:latest", f"{fault_proxy.host}/chunked/bb:1", opts,
                digestfile=str(digestfile))
    patches = [r for r in fault_proxy.requests if r["method"] == "PATCH"]
    layer = layer_blob(busybox_store)
    assert len(patches) >= layer.size // (256 * 1024)
    assert digestfile.read_text() == desc.digest
    other = fresh_store(tmp_path)
    assert pull(other, f"{registry.host}/chunked/bb:1", options(tmp_path)).digest == desc.digest


@pytest.mark.parametrize("streamed", [True, False])
def test_a_failed_chunk_is_sent_again(busybox_store, registry, fault_proxy, tmp_path,
                                      streamed):
    """Streamed chunks (a seekable source: the store) are re-read from the blob file;
    in-memory chunks are resent as they are."""
    from registry_client.push import RemoteSink
    from registry_client.remote import RemoteRepository
    from store.image import copy_image
    from store.reference import parse_reference

    opts = options(tmp_path, chunk_size=64 * 1024, stream_chunk_size=256 * 1024)
    fault_proxy.add(status(500, method="PATCH", times=2))
    image = busybox_store.image("busybox:latest")
    name = f"{fault_proxy.host}/retry{int(streamed)}/bb:1"
    repo = RemoteRepository.for_reference(parse_reference(name), opts)

    def reopen(d):
        return open(busybox_store.layout.blob_path(d.digest), "rb")  # noqa: SIM115

    copy_image(image, RemoteSink(repo, reopen=reopen if streamed else None), tags=["1"])
    patches = [r for r in fault_proxy.requests if r["method"] == "PATCH"]
    assert len([r for r in patches if r.get("fault")]) == 2
    other = fresh_store(tmp_path)
    assert pull(other, f"{registry.host}/retry{int(streamed)}/bb:1",
                options(tmp_path)).digest == image.digest


def test_push_heads_first_and_mounts_from_another_repository(busybox_store, fault_proxy,
                                                             tmp_path):
    push(busybox_store, "busybox:latest", f"{fault_proxy.host}/mount/src:1", options(tmp_path))
    fault_proxy.requests.clear()
    push(busybox_store, "busybox:latest", f"{fault_proxy.host}/mount/dst:1", options(tmp_path))
    posts = [r for r in fault_proxy.requests if r["method"] == "POST"]
    assert posts and all("mount=sha256" in r["path"] and "from=mount%2Fsrc" in r["path"]
                         for r in posts)
    assert not [r for r in fault_proxy.requests if r["method"] in ("PATCH",)]
    # pushing the same image again uploads nothing: every blob HEADs as present
    fault_proxy.requests.clear()
    push(busybox_store, "busybox:latest", f"{fault_proxy.host}/mount/dst:2", options(tmp_path))
    assert {r["method"] for r in fault_proxy.requests} <= {"GET", "HEAD", "PUT"}
    assert [r["method"] for r in fault_proxy.requests if r["method"] == "PUT"] == ["PUT"]


def test_push_gzip_recompresses_once_and_remembers_both_digests(busybox_store, registry,
                                                                tmp_path):
    from store.blobinfo import BlobInfoCache

    layer = layer_blob(busybox_store)
    a = push(busybox_store, "busybox:latest", f"{registry.host}/gz/a:1", options(tmp_path),
             compression="gzip")
    known = BlobInfoCache(busybox_store.root).compressed(layer.diff_id, "gzip")
    assert known is not None and known["digest"] != layer.digest
    assert busybox_store.has_blob(known["digest"])
    b = push(busybox_store, "busybox:latest", f"{registry.host}/gz/b:1", options(tmp_path),
             compression="gzip")
    assert a.digest == b.digest != busybox_store.resolve("busybox:latest").digest
    pulled = fresh_store(tmp_path)
    pull(pulled, f"{registry.host}/gz/b:1", options(tmp_path))
    got = pulled.image(f"{registry.host}/gz/b:1").layers()[0]
    assert got.media_type.endswith("+gzip") and got.diff_id == layer.diff_id


def test_push_by_digest_must_match(busybox_store, registry, tmp_path):
    digest = busybox_store.resolve("busybox:latest").digest
    push(busybox_store, "busybox:latest", f"{registry.host}/pin/bb@{digest}", options(tmp_path))
    with pytest.raises(RegistryError, match="digest"):
        push(busybox_store, "busybox:latest", f"{registry.host}/pin/bb@sha256:{'2' * 64}",
             options(tmp_path))


# ------------------------------------------------------------------ auth


def test_basic_auth(busybox_store, basic_registry, tmp_path):
    ref = f"{basic_registry.host}/basic/bb:1"
    with pytest.raises(AuthError, match="authentication required"):
        push(busybox_store, "busybox:latest", ref, options(tmp_path))
    with pytest.raises(AuthError, match="refused"):
        push(busybox_store, "busybox:latest", ref, options(tmp_path, creds="alice:wrong"))
    push(busybox_store, "busybox:latest", ref, options(tmp_path, creds="alice:wonderland"))
    other = fresh_store(tmp_path)
    pull(other, ref, options(tmp_path, creds="alice:wonderland"))
    assert other.resolve(ref)


def test_token_auth_scoped_and_cached(busybox_store, token_registry, tmp_path):
    ts = token_registry.token_server
    ref = f"{token_registry.host}/team/app:1"
    push(busybox_store, "busybox:latest", ref, options(tmp_path, creds="alice:wonderland"))
    scopes = [s for r in ts.requests for s in r["query"].get("scope", [])]
    assert "repository:team/app:pull,push" in scopes
    # one token per scope, reused for every blob and the manifest
    assert len(ts.requests) <= 3
    assert all(r["headers"].get("Authorization", "").startswith("Basic ") for r in ts.requests)
    ts.requests.clear()
    ts.token_key = "access_token"
    other = fresh_store(tmp_path)
    pull(other, ref, options(tmp_path, creds="bob:builder"))
    assert [s for r in ts.requests for s in r["query"].get("scope", [])] == [
        "repository:team/app:pull"]


def test_token_auth_insufficient_scope_is_a_clear_error(busybox_store, token_registry,
                                                        tmp_path):
    with pytest.raises(AuthError, match="denied|refused|scope") as e:
        push(busybox_store, "busybox:latest", f"{token_registry.host}/denied/app:1",
             options(tmp_path, creds="bob:builder"))
    assert "builder" not in str(e.value)


def test_token_auth_without_credentials(busybox_store, token_registry, tmp_path):
    with pytest.raises(AuthError):
        pull(fresh_store(tmp_path), f"{token_registry.host}/team/none:1", options(tmp_path))


def test_credentials_from_an_auth_file(busybox_store, basic_registry, tmp_path):
    from registry_client.credentials import Credentials, store_credentials

    authfile = tmp_path / "auth.json"
    store_credentials(basic_registry.host, Credentials("alice", "wonderland"),
                      authfile=str(authfile))
    push(busybox_store, "busybox:latest", f"{basic_registry.host}/file/bb:1",
         options(tmp_path, authfile=str(authfile)))


# ------------------------------------------------------------------ TLS


def test_tls_with_the_registry_ca(busybox_store, tls_registry, tmp_path):
    ref = f"{tls_registry.host}/tls/bb:1"
    with pytest.raises(RegistryError, match="TLS verification failed|certificate"):
        push(busybox_store, "busybox:latest", ref, options(tmp_path,
                                                           certs_d=str(tmp_path / "none")))
    push(busybox_store, "busybox:latest", ref,
         options(tmp_path, cert_dir=str(tls_registry.certs_d / tls_registry.host)))
    other = fresh_store(tmp_path)
    pull(other, ref, options(tmp_path, certs_d=str(tls_registry.certs_d)))  # certs.d layout
    pull(fresh_store(tmp_path, "insecure"), ref, options(tmp_path, tls_verify=False))


# ------------------------------------------------------------------ faults


def test_connection_dropped_mid_blob_resumes(busybox_store, registry, fault_proxy, tmp_path):
    push(busybox_store, "busybox:latest", f"{registry.host}/drop/bb:1", options(tmp_path))
    layer = layer_blob(busybox_store)
    fault_proxy.add(drop_after(layer.size // 2, path=layer.digest))
    other = fresh_store(tmp_path)
    pull(other, f"{fault_proxy.host}/drop/bb:1", options(tmp_path))
    gets = [r for r in blob_gets(fault_proxy) if layer.digest in r["path"]]
    assert len(gets) == 2 and gets[1]["headers"].get("Range", "").startswith("bytes=")
    assert other.has_layer_dir(layer.diff_id)


def test_bursts_of_500_and_429_are_retried(busybox_store, registry, fault_proxy, tmp_path):
    push(busybox_store, "busybox:latest", f"{registry.host}/burst/bb:1", options(tmp_path))
    fault_proxy.add(status(500, path="/manifests/", times=2))
    fault_proxy.add(status(429, retry_after=1, path=BLOB, times=2))
    started = time.monotonic()
    pull(fresh_store(tmp_path), f"{fault_proxy.host}/burst/bb:1", options(tmp_path))
    assert time.monotonic() - started >= 2.0  # Retry-After: 1, twice
    # and a registry that never recovers: bounded, with a clear message
    fault_proxy.add(status(503, path="/manifests/", times=None))
    started = time.monotonic()
    with pytest.raises(RegistryError, match="503"):
        pull(fresh_store(tmp_path, "x"), f"{fault_proxy.host}/burst/bb:1",
             options(tmp_path, retries=3, retry_budget=5))
    assert time.monotonic() - started < 15


def test_corrupt_blob_is_refused_and_nothing_stored(busybox_store, registry, fault_proxy,
                                                    tmp_path):
    push(busybox_store, "busybox:latest", f"{registry.host}/corrupt/bb:1", options(tmp_path))
    layer = layer_blob(busybox_store)
    fault_proxy.add(corrupt_body(path=layer.digest))
    other = fresh_store(tmp_path)
    with pytest.raises((DigestError, KilnError)) as e:
        pull(other, f"{fault_proxy.host}/corrupt/bb:1", options(tmp_path))
    assert layer.digest[7:19] in str(e.value) or layer.digest in str(e.value)
    assert_nothing_stored(other)
    assert os.listdir(other.tmp) == []


@pytest.mark.parametrize("delta", [100, -10])
def test_a_lying_content_length_does_not_fool_the_digest(busybox_store, registry, fault_proxy,
                                                         tmp_path, delta):
    push(busybox_store, "busybox:latest", f"{registry.host}/lie/bb:1", options(tmp_path))
    layer = layer_blob(busybox_store)
    fault_proxy.add(lie_content_length(delta, path=layer.digest))
    other = fresh_store(tmp_path)
    pull(other, f"{fault_proxy.host}/lie/bb:1", options(tmp_path, idle_timeout=3))
    with other.layout.open_blob(layer.digest, layer.size) as f:
        assert sha256_digest(f.read()) == layer.digest


def test_redirect_to_another_host_gets_no_credentials(busybox_store, basic_registry, tmp_path):
    from tests.registry.faults import BlobHost

    ref = f"{basic_registry.host}/redir/bb:1"
    push(busybox_store, "busybox:latest", ref, options(tmp_path, creds="alice:wonderland"))
    with BlobHost(basic_registry) as blobs, FaultProxy(basic_registry) as proxy:
        proxy.add(redirect_to(blobs.url, path=BLOB))
        other = fresh_store(tmp_path)
        pull(other, f"{proxy.host}/redir/bb:1", options(tmp_path, creds="alice:wonderland"))
        assert blobs.requests, "the redirect was not followed"
        assert all("Authorization" not in r["headers"] for r in blobs.requests)
        assert any("Authorization" in r["headers"] for r in proxy.requests)


def test_an_endless_401_gives_up(busybox_store, registry, fault_proxy, tmp_path):
    fault_proxy.add(auth_loop(path="/v2/loop/"))
    with pytest.raises(AuthError, match="refused"):
        pull(fresh_store(tmp_path), f"{fault_proxy.host}/loop/bb:1",
             options(tmp_path, creds="alice:wonderland"))
    assert len([r for r in fault_proxy.requests if "/v2/loop/" in r["path"]]) <= 3


def test_a_manifest_over_4_mib_is_refused(registry, fault_proxy, tmp_path):
    fault_proxy.add(oversize_manifest(4 * 1024 * 1024 + 1, path="/big/"))
    with pytest.raises(RegistryError, match="larger than 4194304"):
        pull(fresh_store(tmp_path), f"{fault_proxy.host}/big/bb:1", options(tmp_path))


def test_a_slow_drip_times_out(busybox_store, registry, fault_proxy, tmp_path):
    push(busybox_store, "busybox:latest", f"{registry.host}/drip/bb:1", options(tmp_path))
    layer = layer_blob(busybox_store)
    fault_proxy.add(slow_drip(0.2, 64, path=layer.digest, times=None))
    other = fresh_store(tmp_path)
    started = time.monotonic()
    with pytest.raises(RegistryError, match="timed out"):
        pull(other, f"{fault_proxy.host}/drip/bb:1", options(tmp_path, overall_timeout=3,
                                                             idle_timeout=2))
    assert time.monotonic() - started < 20
    assert_nothing_stored(other)


def _serve_manifest(proxy: FaultProxy, path: str, body: bytes, media_type: str) -> None:
    proxy.add(status(200, path=path, times=None, body=body, headers={
        "Content-Type": media_type, "Docker-Content-Digest": sha256_digest(body)}))


def test_a_document_with_layers_and_manifests_is_refused(fault_proxy, tmp_path):
    doc = {"schemaVersion": 2, "config": {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": "sha256:" + "a" * 64, "size": 2}, "layers": [], "manifests": []}
    _serve_manifest(fault_proxy, "/ambig/", json.dumps(doc).encode(),
                    "application/vnd.oci.image.manifest.v1+json")
    other = fresh_store(tmp_path)
    with pytest.raises(RegistryError, match="manifests"):
        pull(other, f"{fault_proxy.host}/ambig/x:1", options(tmp_path))
    assert_nothing_stored(other)


def test_schema1_is_refused_clearly(fault_proxy, tmp_path):
    doc = {"schemaVersion": 1, "name": "old/x", "tag": "1", "architecture": "amd64",
           "fsLayers": [], "history": []}
    _serve_manifest(fault_proxy, "/old/", json.dumps(doc).encode(),
                    "application/vnd.docker.distribution.manifest.v1+prettyjws")
    with pytest.raises(RegistryError, match="schema1"):
        pull(fresh_store(tmp_path), f"{fault_proxy.host}/old/x:1", options(tmp_path))


def test_a_manifest_that_does_not_match_its_digest_is_refused(busybox_store, registry,
                                                              fault_proxy, tmp_path):
    pushed = push(busybox_store, "busybox:latest", f"{registry.host}/lying/bb:1",
                  options(tmp_path))
    fault_proxy.add(corrupt_body(path="/manifests/", times=None))
    with pytest.raises(RegistryError, match="digest"):
        pull(fresh_store(tmp_path), f"{fault_proxy.host}/lying/bb@{pushed.digest}",
             options(tmp_path))
    with pytest.raises(RegistryError, match="Docker-Content-Digest|invalid manifest"):
        pull(fresh_store(tmp_path, "b"), f"{fault_proxy.host}/lying/bb:1", options(tmp_path))


def test_pulls_in_parallel_threads_share_nothing_bad(busybox_store, registry, tmp_path):
    push(busybox_store, "busybox:latest", f"{registry.host}/par/bb:1", options(tmp_path))
    other = fresh_store(tmp_path)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            pull(other, f"{registry.host}/par/bb:1", options(tmp_path))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(other.layer_diff_ids_on_disk()) == 1
