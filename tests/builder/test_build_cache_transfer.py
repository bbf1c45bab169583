"""--cache-to / --cache-from (issue 13): a fresh runner (an empty store) takes its steps
from a build cache that another store wrote to a real registry or to a directory.

Every RUN step prints RAN-<name> (its text says RAN""-<name>), which a step taken from the
cache does not, and writes random bytes, so a step that ran again would also change the
image ID."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.builder.conftest import build_context
from tests.conftest import KilnCLI
from tests.registry.conftest import (  # noqa: F401 - fixtures
    _token_registry_module,
    registry,
    token_registry,
)

MULTI = """\
FROM {base} AS tools
RUN echo RAN""-tools && head -c 16 /dev/urandom > /made-at && mkdir /out && echo tool > /out/tool
FROM {base}
COPY --from=tools /out/tool /usr/local/bin/tool
COPY app.txt /app/app.txt
ENV MODE=test
RUN echo RAN""-final && head -c 16 /dev/urandom > /built-at
CMD ["cat", "/app/app.txt"]
"""


@pytest.fixture
def base(tmp_path, busybox_rootfs, registry):  # noqa: F811
    """busybox pushed to the registry, as CI runners get their base images: the same
    manifest digest (so the same cache keys) on every machine."""
    pusher = KilnCLI(tmp_path / "pusher")
    pusher("import", str(busybox_rootfs), "busybox")
    ref = f"{registry.host}/cachetest/busybox:{tmp_path.name.lower()[-20:]}"
    pusher("tag", "busybox", ref)
    pusher("push", "-q", ref)
    return ref


def _context(tmp_path: Path, base: str) -> Path:
    return build_context(tmp_path, MULTI.format(base=base), {"app.txt": "hello\n"})


def _runner(tmp_path: Path, name: str) -> KilnCLI:
    return KilnCLI(tmp_path / name)  # an empty store: a fresh CI runner


def _iid(kiln: KilnCLI, ctx: Path, *flags: str):
    iid = ctx.parent / "iid"
    p = kiln("build", "-t", "app:1", "--iidfile", str(iid), *flags, str(ctx))
    return iid.read_text(), p


def _requests(registry, method: str, kind: str) -> list[str]:  # noqa: F811
    """The registry's log lines of ``method`` requests to blobs or manifests."""
    text = registry.log.read_text(errors="replace")
    return re.findall(rf'http.request.method={method} http.request.remoteaddr=\S+ '
                      rf'http.request.uri="(/v2/\S+/{kind}/[^"]*)"', text)


def test_fresh_runner_takes_every_step_from_a_registry_cache(tmp_path, base, registry):  # noqa: F811
    ctx = _context(tmp_path, base)
    cache_ref = f"{registry.host}/cachetest/app:cache-{tmp_path.name.lower()[-20:]}"
    first = _runner(tmp_path, "runner-a")
    first_id, p = _iid(first, ctx, "--cache-to", f"type=registry,ref={cache_ref},mode=max")
    assert "RAN-tools" in p.out + p.err and "RAN-final" in p.out + p.err
    exported = re.search(r"--> cache: (\d+) steps, (\d+) layers to \S+ \((sha256:\w+)",
                         p.err)
    assert exported and int(exported[2]) == 4, p.err  # tools RUN, two COPYs, final RUN

    before = len(_requests(registry, "GET", "blobs"))
    fresh = _runner(tmp_path, "runner-b")
    fresh_id, p = _iid(fresh, ctx, "--cache-from", f"type=registry,ref={cache_ref}")
    out = p.out + p.err
    assert "RAN-" not in out, out  # no RUN ran
    assert out.count("--> CACHED") == 4, out
    assert fresh_id == first_id  # the same image, its history times included
    assert fresh("run", "--rm", "app:1").out == "hello\n"
    # what it fetched: the base image's layer and config, the cache's config and the four
    # layers of its steps (three of them in the image; the tools one to COPY from)
    fetched = _requests(registry, "GET", "blobs")[before:]
    assert len(fetched) == len(set(fetched)) == 1 + 1 + 1 + 4, fetched

    # writing the cache again from the fresh runner uploads nothing: it is the same cache
    uploads = len(_requests(registry, "POST", "blobs"))
    _, p = _iid(fresh, ctx, "--cache-from", cache_ref, "--cache-to",
                f"type=registry,ref={cache_ref},mode=max")
    assert f"({exported[3][:19]})" in p.err
    assert len(_requests(registry, "POST", "blobs")) == uploads


def test_a_cache_behind_token_auth(tmp_path, base, token_registry):  # noqa: F811
    """CI registries want credentials: the cache is written with alice's and read with
    bob's (pull-only there), through the token flow; without any, a warning."""
    ctx = _context(tmp_path, base)
    cache_ref = f"{token_registry.host}/team/cache-{tmp_path.name.lower()[-20:]}:1"
    first_id, _ = _iid(_runner(tmp_path, "a"), ctx, "--creds", "alice:wonderland",
                       "--cache-to", f"type=registry,ref={cache_ref},mode=max")
    fresh_id, p = _iid(_runner(tmp_path, "b"), ctx, "--creds", "bob:builder",
                       "--cache-from", cache_ref)
    assert "RAN-" not in p.out + p.err and fresh_id == first_id
    _, p = _iid(_runner(tmp_path, "c"), ctx, "--cache-from", cache_ref)
    assert "cannot read the cache" in p.err and "RAN-final" in p.out + p.err
    denied = f"{token_registry.host}/denied/app:cache"  # bob may not push there
    p = _runner(tmp_path, "d")("build", "--creds", "bob:builder", "--cache-to", denied,
                              str(ctx), check=False)
    assert p.returncode == 125 and f"--cache-to {denied}" in p.err, p.err
    p = _runner(tmp_path, "d")("build", "--creds", "bob:builder", "--cache-to",
                              f"type=registry,ref={denied},ignore-error=true", str(ctx))
    assert "warning: --cache-to" in p.err


def test_mode_min_keeps_only_the_image_stage_chain(tmp_path, base, registry):  # noqa: F811
    run = 'RUN echo RAN""-final && head -c 16 /dev/urandom > /built-at'
    single = build_context(tmp_path, f"FROM {base}\nCOPY app.txt /app.txt\n{run}\n",
                           {"app.txt": "hi\n"}, name="single")
    cache_ref = f"{registry.host}/cachetest/min:{tmp_path.name.lower()[-20:]}"
    first_id, p = _iid(_runner(tmp_path, "a"), single, "--cache-to", cache_ref)  # min
    fresh_id, p = _iid(_runner(tmp_path, "b"), single, "--cache-from", cache_ref)
    assert "RAN-final" not in p.out + p.err and fresh_id == first_id
    # a multi-stage build: min leaves out the stage the image copies from, which a fresh
    # runner builds again; kiln's COPY --from key names the layers copied from (new ones
    # now), so the image's steps from there on run again too (mode=max is for this)
    multi = _context(tmp_path, base)
    _, p = _iid(_runner(tmp_path, "c"), multi, "--cache-to", f"{cache_ref}-multi")
    assert re.search(r"--> cache: \d+ steps, 3 layers", p.err), p.err
    _, p = _iid(_runner(tmp_path, "d"), multi, "--cache-from", f"{cache_ref}-multi")
    out = p.out + p.err
    assert "RAN-tools" in out and "RAN-final" in out, out
    assert out.count("--> CACHED") == 0, out


def test_local_directory_cache_is_an_oci_layout(tmp_path, base):
    ctx = _context(tmp_path, base)
    cache_dir = tmp_path / "ci-cache"
    first_id, _ = _iid(_runner(tmp_path, "a"), ctx, "--cache-to",
                       f"type=local,dest={cache_dir},mode=max,tag=main")
    assert json.loads((cache_dir / "oci-layout").read_text())["imageLayoutVersion"]
    index = json.loads((cache_dir / "index.json").read_text())
    assert [m["annotations"]["org.opencontainers.image.ref.name"]
            for m in index["manifests"]] == ["main"]
    fresh_id, p = _iid(_runner(tmp_path, "b"), ctx, "--cache-from",
                       f"type=local,src={cache_dir},tag=main")
    assert "RAN-" not in p.out + p.err and fresh_id == first_id


def test_inline_cache_in_a_pushed_image(tmp_path, base, registry):  # noqa: F811
    run = 'RUN echo RAN""-final && head -c 16 /dev/urandom > /built-at'
    ctx = build_context(tmp_path, f"FROM {base}\nCOPY app.txt /app.txt\nENV A=1\n{run}\n",
                        {"app.txt": "hi\n"}, name="inline")
    image = f"{registry.host}/cachetest/inline:{tmp_path.name.lower()[-20:]}"
    first = _runner(tmp_path, "a")
    first_id, _ = _iid(first, ctx, "--cache-to", "type=inline", "-t", image)
    first("push", "-q", image)
    fresh = _runner(tmp_path, "b")
    fresh_id, p = _iid(fresh, ctx, "--cache-from", image, "--cache-to", "type=inline")
    out = p.out + p.err
    assert "RAN-final" not in out and out.count("--> CACHED") == 2, out
    assert fresh_id == first_id  # the same image, its inline cache included
    # a rebuild with a change takes the steps before it from the image
    (ctx / "Containerfile").write_text(f"FROM {base}\nCOPY app.txt /app.txt\nENV A=2\n{run}\n")
    _, p = _iid(_runner(tmp_path, "c"), ctx, "--cache-from", image)
    assert "RAN-final" in p.out + p.err and (p.out + p.err).count("--> CACHED") == 1
    # an image built without one: a warning, and the build goes on
    plain = f"{image}-plain"
    first("build", "-q", "-t", plain, str(ctx))
    first("push", "-q", plain)
    p = fresh("build", "-q", "--cache-from", plain, str(ctx))
    assert "the image holds no build cache" in p.err


def test_mode_max_carries_run_cache_mounts_to_a_fresh_runner(tmp_path, base):
    """Beyond BuildKit (moby/buildkit#1512): the contents of a RUN --mount=type=cache dir
    travel with a mode=max cache, so a fresh runner's step that must run again (its input
    changed) finds what the last run left there, as a warm runner would."""
    def context(version: str) -> Path:
        return build_context(tmp_path, (
            f"FROM {base}\nARG V={version}\n"
            "RUN --mount=type=cache,target=/var/cache/dl,id=downloads,uid=7 "
            "if [ -f /var/cache/dl/pkg ]; then echo HIT-$(cat /var/cache/dl/pkg)-"
            "$(stat -c %u /var/cache/dl); else echo MISS; echo fetched > /var/cache/dl/pkg; "
            "fi && echo $V > /v\n"), name=f"mount-{version}")

    cache_dir = tmp_path / "cache"
    _, p = _iid(_runner(tmp_path, "a"), context("1"), "--cache-to",
                f"type=local,dest={cache_dir},mode=max")
    assert "MISS" in p.out + p.err and "1 cache mounts" in p.err, p.err
    _, p = _iid(_runner(tmp_path, "b"), context("2"), "--cache-from",
                f"type=local,src={cache_dir}")
    assert "HIT-fetched-7" in p.out + p.err, p.out + p.err
    # mode=min carries no cache mount
    _, p = _iid(_runner(tmp_path, "c"), context("1"), "--cache-to",
                f"type=local,dest={tmp_path / 'min'}")
    assert "cache mounts" not in p.err
    _, p = _iid(_runner(tmp_path, "d"), context("2"), "--cache-from",
                f"type=local,src={tmp_path / 'min'}")
    assert "MISS" in p.out + p.err


def test_a_missing_cache_warns_and_bad_specs_are_clear_errors(tmp_path, base, registry):  # noqa: F811
    ctx = _context(tmp_path, base)
    kiln = _runner(tmp_path, "a")
    p = kiln("build", "-q", "--cache-from", f"{registry.host}/cachetest/none:yet",
             "--cache-from", f"type=local,src={tmp_path}/nothing", str(ctx))
    assert "no cache there yet" in p.err and "no cache there" in p.err
    for spec, why in [("type=gha", "type must be registry, local or inline"),
                      ("type=registry", "ref= is missing"),
                      ("type=local,src=/x", "dest= is missing"),
                      ("type=registry,ref=r/x:1,mode=most", "mode must be min or max"),
                      ("type=registry,ref=r/x:1,colour=red", "unknown key(s) colour"),
                      ("type=registry,ref=r/Bad:1", "invalid")]:
        p = kiln("build", "--cache-to", spec, str(ctx), check=False)
        assert p.returncode == 125 and why in p.err, (spec, p.err)
    p = kiln("build", "--cache-from", "type=local,dest=/x", str(ctx), check=False)
    assert p.returncode == 125 and "src= is missing" in p.err


def _rewrite_cache(cache_dir: Path, change) -> None:
    """Change a local cache's config with ``change(doc)`` and re-digest it, as a hostile
    cache writer would: every digest in the layout still matches its bytes."""
    import hashlib

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (cache_dir / "blobs" / "sha256" / digest).write_bytes(data)
        return f"sha256:{digest}"

    index = json.loads((cache_dir / "index.json").read_text())
    entry = index["manifests"][0]
    manifest = json.loads((cache_dir / "blobs/sha256" / entry["digest"][7:]).read_bytes())
    doc = json.loads((cache_dir / "blobs/sha256" / manifest["config"]["digest"][7:])
                     .read_bytes())
    change(doc)
    raw = json.dumps(doc).encode()
    manifest["config"].update(digest=put(raw), size=len(raw))
    raw = json.dumps(manifest).encode()
    entry.update(digest=put(raw), size=len(raw))
    (cache_dir / "index.json").write_text(json.dumps(index))


def test_a_hostile_cache_cannot_slip_in_a_layer_or_break_the_build(tmp_path, base):
    ctx = _context(tmp_path, base)
    cache_dir = tmp_path / "cache"
    _iid(_runner(tmp_path, "a"), ctx, "--cache-to", f"type=local,dest={cache_dir},mode=max")

    def swap_layers(doc):  # every step's record names another step's layer
        recs = [r for r in doc["records"].values() if r["layer"]]
        layers = [r["layer"] for r in recs]
        for r, la in zip(recs, layers[1:] + layers[:1], strict=True):
            r["layer"] = {**la, "diff_id": r["layer"]["diff_id"]}

    _rewrite_cache(cache_dir, swap_layers)
    kiln = _runner(tmp_path, "b")
    _, p = _iid(kiln, ctx, "--cache-from", f"type=local,src={cache_dir}")
    out = p.out + p.err
    # each layer is checked against the diff_id its record claims: none is taken, the
    # steps run, and the build still succeeds
    assert "RAN-tools" in out and "RAN-final" in out, out
    assert "cannot take step" in p.err and "diff_id" in p.err
    assert kiln("run", "--rm", "app:1").out == "hello\n"

    # a record whose layer is a zstd bomb (its diff_id true): refused by the extractor's
    # limits before it is hashed to the end, and the step runs
    import hashlib
    import io
    import tarfile

    import zstandard

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        info = tarfile.TarInfo("zeros")
        info.size = 8 << 20
        t.addfile(info, io.BytesIO(bytes(info.size)))
    bomb = zstandard.ZstdCompressor().compress(raw.getvalue())
    digest = hashlib.sha256(bomb).hexdigest()
    (cache_dir / "blobs" / "sha256" / digest).write_bytes(bomb)

    def plant_bomb(doc):
        for rec in doc["records"].values():
            if rec["layer"]:
                rec["layer"] = {"digest": f"sha256:{digest}", "size": len(bomb),
                                "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
                                "diff_id": "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()}

    _rewrite_cache(cache_dir, plant_bomb)
    bombed = _runner(tmp_path, "e")
    p = bombed("build", "--cache-from", f"type=local,src={cache_dir}", str(ctx),
               env={"KILN_LAYER_RATIO_FROM": "1M", "KILN_MAX_LAYER_RATIO": "10"})
    assert "decompression bomb" in p.err and "RAN-final" in p.out + p.err, p.err

    _rewrite_cache(cache_dir, lambda doc: doc["records"].update({"../../etc": {}}))
    p = kiln("build", "--cache-from", f"type=local,src={cache_dir}", str(ctx), check=False)
    assert p.returncode == 125 and "malformed record '../../etc'" in p.err, p.err
