"""RUN --mount (cache, secret, bind, tmpfs) end to end: real builds, real sandboxes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.builder.conftest import build_context as _ctx
from tests.conftest import PROJECT


def _run(kb, image: str, script: str) -> str:
    return kb("run", "--rm", image, "sh", "-c", script).out


def _last_layer(kb, broot: Path, image: str) -> list[str]:
    """Every path in the image's last layer (its upper dir as committed)."""
    diff_id = json.loads(kb("inspect", image).out)[0]["Layers"][-1]["DiffID"]
    top = broot / "layers" / diff_id.split(":")[1] / "diff"
    return sorted(str(p.relative_to(top)) for p in top.rglob("*"))


def _cache_dir(broot: Path, ident: str, n: int = 0) -> Path:
    name = hashlib.sha256(ident.encode()).hexdigest()
    return broot / "cache-mounts" / (name if n == 0 else f"{name}.{n}")


# -- parsing ---------------------------------------------------------------------------------
def test_mount_flags_parse_with_buildkit_defaults():
    from builder.mounts import MountError, parse_mount

    def same(word: str) -> str:
        return word.replace("$T", "/tgt")

    bind = parse_mount("target=$T,source=src", same)
    assert (bind.type, bind.target, bind.readonly) == ("bind", "/tgt", True)
    cache = parse_mount("type=cache,dst=rel/dir", same, workdir="/app")
    assert (cache.target, cache.readonly, cache.id, cache.sharing) == (
        "/app/rel/dir", False, "/app/rel/dir", "shared")
    secret = parse_mount("type=secret,id=tok,required", same)
    assert (secret.target, secret.required, secret.readonly) == ("/run/secrets/tok", True, True)
    assert parse_mount("type=secret,id=tok,env=TOKEN", same).target == ""
    assert parse_mount("type=secret,target=/etc/key", same).id == "key"
    assert parse_mount("type=tmpfs,target=/t,size=64m", same).size == 64 << 20
    assert parse_mount('"type=bind","target=/a,b",rw', same).target == "/a,b"
    for bad, reason in [("type=bogus,target=/x", "unsupported mount type"),
                        ("type=tmpfs,target=/x,uid=1", "not allowed"),
                        ("type=bind,target=/x,sharing=locked", "sharing"),
                        ("type=cache,target=/x,sharing=sometimes", "sharing value"),
                        ("type=cache,target=/x,required", "unexpected key"),
                        ("type=bind", "target"), ("type=bind,target=/", "invalid mount target"),
                        ("type=secret,source=a,id=b", "both source and id"),
                        ("type=cache,target=/x,mode=999", "mode"),
                        ("type=bind,target=/x,frobnicate=1", "unexpected key")]:
        with pytest.raises(MountError, match=reason):
            parse_mount(bad, same)


def test_bad_mount_and_network_flags_name_the_line(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nRUN true\nRUN --mount=type=nfs,target=/x true\n")
    p = kb("build", str(ctx), check=False)
    assert p.returncode == 125 and "Containerfile:3" in p.err and "nfs" in p.err
    (ctx / "Containerfile").write_text("FROM busybox\nRUN --network=bridge true\n")
    p = kb("build", str(ctx), check=False)
    assert p.returncode == 125 and "Containerfile:2" in p.err and "bridge" in p.err


# -- cache -----------------------------------------------------------------------------------
def test_cache_mount_persists_across_builds_and_no_cache(kb, broot, tmp_path):
    cf = ("FROM busybox\n"
          "RUN --mount=type=cache,target=/var/cache/app,id=appcache,mode=0710,uid=65534 "
          "sh -c 'echo run >> /var/cache/app/runs; wc -l < /var/cache/app/runs > /runs; "
          "stat -c \"%a %u\" /var/cache/app > /perm'\n")
    ctx = _ctx(tmp_path, cf)
    kb("build", "-t", "cm:1", str(ctx))
    assert _run(kb, "cm:1", "cat /runs /perm").split() == ["1", "710", "65534"]
    p = kb("build", "-t", "cm:1", str(ctx))
    assert "CACHED" in p.err  # a cache mount is no reason to run the step again
    kb("build", "--no-cache", "-t", "cm:2", str(ctx))  # BuildKit keeps cache mounts here too
    assert _run(kb, "cm:2", "cat /runs").strip() == "2"
    on_disk = _cache_dir(broot, "appcache")
    assert (on_disk / "runs").read_text() == "run\nrun\n"
    st = on_disk.stat()
    assert (st.st_mode & 0o7777, st.st_uid) == (0o710, 65534)
    # the mount point (and /var, made for it) is no part of the layer
    assert _last_layer(kb, broot, "cm:2") == ["perm", "runs"]
    assert "missing" in _run(kb, "cm:2", "test -e /var || echo missing")


def _build_proc(broot: Path, ctx: Path) -> subprocess.Popen:
    env = {**os.environ, "KILN_ROOT": str(broot)}
    return subprocess.Popen([sys.executable, "-m", "kiln", "build", "-q", "--no-cache",
                             str(ctx)], cwd=PROJECT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_cache_sharing_locked_serialises_and_private_gets_its_own(broot, tmp_path):
    procs = []
    for i in range(2):
        locked = _ctx(tmp_path, "FROM busybox\nRUN --mount=type=cache,target=/c,id=lk,"
                      f"sharing=locked sh -c 'echo start{i} >> /c/log; sleep 1; "
                      f"echo end{i} >> /c/log'\n", name=f"locked{i}")
        private = _ctx(tmp_path, "FROM busybox\nRUN --mount=type=cache,target=/c,id=pv,"
                       f"sharing=private sh -c 'echo {i} > /c/mine; sleep 1; cat /c/mine "
                       "> /seen'\n", name=f"private{i}")
        procs += [_build_proc(broot, locked), _build_proc(broot, private)]
    started = time.monotonic()
    for p in procs:
        _out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    elapsed = time.monotonic() - started
    log = (_cache_dir(broot, "lk") / "log").read_text().split()
    assert len(log) == 4 and elapsed >= 2.0
    # whichever went first, the other started only after it ended
    assert [w[:-1] for w in log] == ["start", "end", "start", "end"]
    assert log[0][-1] == log[1][-1] and log[2][-1] == log[3][-1]
    # two private users at once: two directories, each kept what its own build wrote
    mine = sorted((_cache_dir(broot, "pv", n) / "mine").read_text() for n in (0, 1))
    assert mine == ["0\n", "1\n"]


# -- secrets ---------------------------------------------------------------------------------
SECRET = "kiln-s3cret-6f1e0c2ad9"
ENV_SECRET = "kiln-env-s3cret-77ab31"


def _every_stored_byte_string(broot: Path) -> list[tuple[str, bytes]]:
    """Every blob of the store (decompressed), every cache record and every unpacked file."""
    from store.compression import decompressing_reader

    found = []
    for blob in (broot / "blobs" / "sha256").iterdir():
        with open(blob, "rb") as f:
            found.append((str(blob), decompressing_reader(f).read()))
    for top in (broot / "cache", broot / "layers", broot / "tmp"):
        for p in top.rglob("*"):
            if p.is_file() and not p.is_symlink():
                found.append((str(p), p.read_bytes()))
    return found


def test_secrets_reach_no_layer_history_or_cache_record(kb, broot, tmp_path):
    secret_file = tmp_path / "token.txt"
    secret_file.write_text(SECRET)
    cf = ("FROM busybox\n"
          "RUN --mount=type=secret,id=tok sh -c 'sha256sum < /run/secrets/tok | cut -c1-64 "
          "> /tok.sha; stat -c \"%a %u %g\" /run/secrets/tok > /tok.stat'\n"
          "RUN --mount=type=secret,id=tok,target=/etc/app/key,mode=0440,uid=65534,gid=65534 "
          "stat -c '%a %u %g' /etc/app/key > /key.stat\n"
          "RUN --mount=type=secret,id=envtok,env=TOKEN sh -c 'printf %s \"$TOKEN\" | "
          "sha256sum | cut -c1-64 > /env.sha; test -e /run/secrets/envtok || echo no > /nofile'\n"
          "RUN --mount=type=secret,id=absent sh -c 'test -e /run/secrets/absent || "
          "echo skipped > /absent'\n")
    ctx = _ctx(tmp_path, cf)
    env = {"KILN_TEST_SECRET": ENV_SECRET}
    secret_args = ["--secret", f"id=tok,src={secret_file}", "--secret",
                   "id=envtok,env=KILN_TEST_SECRET"]
    kb("build", *secret_args, "-t", "sec:1", str(ctx), env=env)
    out = _run(kb, "sec:1", "cat /tok.sha /tok.stat /key.stat /env.sha /nofile /absent")
    assert out.split("\n")[:6] == [
        hashlib.sha256(SECRET.encode()).hexdigest(), "400 0 0", "440 65534 65534",
        hashlib.sha256(ENV_SECRET.encode()).hexdigest(), "no", "skipped"]
    assert "gone" in _run(kb, "sec:1", "test -e /run || test -e /etc/app || echo gone")
    history = json.dumps(json.loads(kb("inspect", "sec:1").out)[0])
    assert "tok" in history  # the instruction is there, ...
    for path, data in _every_stored_byte_string(broot):
        # ... the values are not, anywhere: blobs (layers, configs), cache records, layer dirs
        assert SECRET.encode() not in data, path
        assert ENV_SECRET.encode() not in data, path
    # the key holds the id, not the value: another value is still a cache hit
    secret_file.write_text("another value")
    p = kb("build", *secret_args, "-t", "sec:1", str(ctx), env=env)
    assert p.err.count("CACHED") == 4


def test_required_secret_missing_fails_with_its_id(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nRUN --mount=type=secret,id=npmrc,required=true cat "
               "/run/secrets/npmrc\n")
    p = kb("build", str(ctx), check=False)
    assert p.returncode == 125
    assert "Containerfile:2" in p.err and "npmrc" in p.err and "--secret" in p.err


# -- bind ------------------------------------------------------------------------------------
def test_bind_from_context_read_only_filtered_and_keyed_by_content(kb, broot, tmp_path):
    cf = ("FROM busybox\n"
          "RUN --mount=source=sub,target=/src sh -c 'cat /src/a.txt > /out; ls -A /src > /list;"
          " touch /src/new 2>/dev/null && echo writable >> /out || echo read-only >> /out'\n"
          "RUN --mount=type=bind,source=link,target=/via-link cat /via-link/a.txt > /linked\n"
          "RUN --mount=source=sub/a.txt,target=/etc/app.conf,rw sh -c 'cat /etc/app.conf > /one;"
          " echo more >> /etc/app.conf'\n"
          "RUN --mount=type=bind,source=sub,target=/src,rw sh -c 'echo scribbled > /src/a.txt "
          "&& cat /src/a.txt > /rw'\n")
    ctx = _ctx(tmp_path, cf, {"sub/a.txt": "from the context\n", "sub/skip.log": "no",
                              "other.txt": "unrelated", ".dockerignore": "sub/*.log\n"})
    os.symlink("sub", ctx / "link")
    kb("build", "-t", "bc:1", str(ctx))
    out = _run(kb, "bc:1", "cat /out /list /linked /one /rw; test -e /etc/app.conf || echo ok")
    assert out == ("from the context\nread-only\na.txt\nfrom the context\nfrom the context\n"
                   "scribbled\nok\n")
    assert (ctx / "sub" / "a.txt").read_text() == "from the context\n"  # rw wrote a copy
    assert _last_layer(kb, broot, "bc:1") == ["rw"]
    (ctx / "other.txt").write_text("changed, but not mounted")
    assert kb("build", "-t", "bc:1", str(ctx)).err.count("CACHED") == 4
    (ctx / "sub" / "a.txt").write_text("new content\n")
    p = kb("build", "-t", "bc:2", str(ctx))
    assert p.err.count("CACHED") == 0
    assert _run(kb, "bc:2", "head -1 /out") == "new content\n"


def test_bind_from_stage_resolves_symlinks_inside_the_stage(kb, broot, tmp_path):
    cf = ("FROM busybox AS data\n"
          "RUN mkdir -p /opt/data && echo stage-file > /opt/data/f && ln -s /opt/data /abs && "
          "echo stage-etc > /etc/marker && ln -s ../../../../etc /climb\n"
          "FROM busybox\n"
          "RUN --mount=from=data,source=/abs,target=/m cat /m/f > /abs.txt\n"
          "RUN --mount=from=data,source=/climb,target=/m sh -c 'cat /m/marker > /climb.txt; "
          "test -e /m/debian_version || test -e /m/os-release || echo not-host >> /climb.txt'\n"
          "RUN --mount=from=data,source=/opt/data,target=/m sh -c 'echo x > /m/f 2>/dev/null "
          "|| echo read-only > /ro.txt'\n"
          "RUN --mount=from=0,source=/opt/data,target=/m,rw sh -c 'echo x > /m/f && cat /m/f "
          "> /rw.txt'\n"
          "RUN --mount=from=data,source=/opt/data,target=/m cat /m/f > /after.txt\n")
    ctx = _ctx(tmp_path, cf)
    kb("build", "-t", "bs:1", str(ctx))
    out = _run(kb, "bs:1", "cat /abs.txt /climb.txt /ro.txt /rw.txt /after.txt")
    assert out == "stage-file\nstage-etc\nnot-host\nread-only\nx\nstage-file\n"
    assert "no-mnt" in _run(kb, "bs:1", "test -e /m || echo no-mnt")
    assert _last_layer(kb, broot, "bs:1") == ["after.txt"]


def test_tmpfs_and_nested_mounts_leave_nothing_in_the_layer(kb, broot, tmp_path):
    cf = ("FROM busybox\n"
          "RUN --mount=type=cache,id=twice,target=/a,sharing=locked --mount=type=cache,id=twice,"
          "target=/b,sharing=locked sh -c 'echo same > /a/f; cat /b/f > /twice'\n"
          "RUN --mount=type=tmpfs,target=/scratch,size=2m --mount=type=cache,target=/scratch/c,"
          "id=nested sh -c 'echo x > /scratch/f; echo kept >> /scratch/c/log; "
          "df -k /scratch | tail -1 > /df'\n"
          "RUN --mount=type=tmpfs,target=/tmp sh -c 'echo gone > /tmp/t; echo done > /done'\n")
    ctx = _ctx(tmp_path, cf)
    kb("build", "-t", "tf:1", str(ctx))
    df = _run(kb, "tf:1", "cat /df").split()
    assert df[0] == "tmpfs" and df[1] == "2048"
    assert _run(kb, "tf:1", "ls -A /tmp; test -e /scratch || echo none") == "none\n"
    assert _run(kb, "tf:1", "stat -c %a /tmp; cat /twice") == "1777\nsame\n"
    assert _last_layer(kb, broot, "tf:1") == ["done"]
    assert (_cache_dir(broot, "nested") / "log").read_text() == "kept\n"
