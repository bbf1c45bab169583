"""A no-op rebuild after a no-op rebuild comes from builder.memo: the same image, output,
tags and --iidfile as the build itself would give, without loading the builder; any
input that changed (context, Containerfile, build args, environment, base image, the image
itself gone) makes a real build."""

from __future__ import annotations

import json
import os
import re
import time

from builder.context import RACY_WINDOW_NS
from tests.builder.conftest import build_context
from tests.cli.test_run_fast_path import _imported_by

CONTAINERFILE = ("FROM busybox\nARG GREETING\nARG FROM_ENV\nRUN echo $GREETING > /greeting\n"
                 "COPY app/ /app/\nENV MODE=memo\nCMD [\"cat\", \"/greeting\"]\n")


def _settled(ctx) -> None:
    # a file changed in the last 2 s is hashed again by every build: let the context settle
    time.sleep(RACY_WINDOW_NS / 1e9 + 0.2)


def _replayed(kb, args: list[str], env: dict[str, str] | None = None) -> bool:
    """Runs ``kiln ARGS``; whether it came from the memo (the builder never loaded)."""
    return "builder.engine" not in _imported_by(args, kb.root, env)


def _no_timing(text: str) -> str:
    return re.sub(r" in \d+\.\d\ds$", "", text.strip())


def test_a_repeated_no_op_is_replayed_exactly(kb, tmp_path):
    ctx = build_context(tmp_path, CONTAINERFILE, {"app/main.py": "print(1)\n"})
    _settled(ctx)
    args = ["build", "--build-arg", "GREETING=hi", "-t", "memo:1", str(ctx)]
    kb(*args)  # builds
    noop = kb(*args)  # every step cached: leaves the memo
    assert noop.err.count("--> CACHED") == 2
    assert _replayed(kb, args)
    again = kb(*args)
    assert _no_timing(again.err) == _no_timing(noop.err)  # every line, warnings included
    image_id = "sha256:" + json.loads(kb("inspect", "memo:1").out)[0]["Id"]

    # names are what a build gives its result, not what it makes: still replayed
    iid = tmp_path / "iid"
    assert _replayed(kb, [*args[:-1], "-t", "memo:other", "--iidfile", str(iid), str(ctx)])
    assert iid.read_text() == image_id
    assert "sha256:" + json.loads(kb("inspect", "memo:other").out)[0]["Id"] == image_id
    quiet = ["build", "-q", "--build-arg", "GREETING=hi", str(ctx)]
    kb(*quiet)
    assert _replayed(kb, quiet)
    assert kb(*quiet).out.strip() == image_id
    assert kb("run", "--rm", "memo:other").out == "hi\n"


def test_whatever_changed_is_built(kb, broot, tmp_path, busybox_rootfs):
    ctx = build_context(tmp_path, CONTAINERFILE, {"app/main.py": "print(1)\n"})
    _settled(ctx)
    args = ["build", "-q", "--build-arg", "GREETING=hi", "--build-arg", "FROM_ENV",
            "-t", "memo:2", str(ctx)]

    kb(*args)
    kb(*args)  # a no-op: leaves the memo
    assert _replayed(kb, args)
    # the context
    (ctx / "app" / "main.py").write_text("print(2)\n")
    assert not _replayed(kb, args)
    assert kb("run", "--rm", "memo:2", "cat", "/app/main.py").out == "print(2)\n"
    # a context file no COPY uses is still the context: built (and cached)
    kb(*args)
    (ctx / "unused.txt").write_text("x\n")
    assert not _replayed(kb, args)
    # the Containerfile
    kb(*args)
    (ctx / "Containerfile").write_text(CONTAINERFILE.replace("memo", "changed"))
    assert not _replayed(kb, args)
    assert "MODE=changed" in kb("inspect", "memo:2").out
    # a build arg, and one taken from the environment
    kb(*args)
    assert not _replayed(kb, [a.replace("GREETING=hi", "GREETING=ho") for a in args])
    assert kb("run", "--rm", "memo:2").out == "ho\n"
    kb(*args)
    assert not _replayed(kb, args[:-1] + ["--build-arg", "SOURCE_DATE_EPOCH=1", str(ctx)])
    kb(*args, env={"FROM_ENV": "1"})
    kb(*args, env={"FROM_ENV": "1"})  # --build-arg FROM_ENV takes the environment's value
    assert _replayed(kb, args, {"FROM_ENV": "1"})
    assert not _replayed(kb, args, {"FROM_ENV": "2"})
    # the base image: busybox:latest now names another image
    kb(*args)
    kb(*args)
    other = build_context(tmp_path, "FROM busybox\nRUN echo other > /other\n", name="base")
    kb("build", "-q", "-t", "busybox:latest", str(other))
    assert not _replayed(kb, args)
    assert kb("run", "--rm", "memo:2", "cat", "/other").out == "other\n"
    # the image itself removed and pruned
    kb(*args)
    kb("rmi", "memo:2")
    kb("prune")
    assert not _replayed(kb, args)
    assert kb("run", "--rm", "memo:2").out == "hi\n"
    # --no-cache never replays; --build-cache prune drops the memos
    assert not _replayed(kb, [*args[:-1], "--no-cache", str(ctx)])
    kb(*args)
    kb("prune", "--build-cache")
    assert not os.path.exists(broot / "cache" / "builds")
    assert not _replayed(kb, args)


def _memo_fingerprints(broot) -> list:
    out = []
    for name in sorted(os.listdir(broot / "cache" / "builds")):
        with open(broot / "cache" / "builds" / name) as f:
            out.append(json.load(f).get("fingerprint"))
    return out


def test_a_context_fingerprint_skips_the_walk_and_misses_no_change(kb, broot, tmp_path):
    """The memo keeps the stat keys of the context's dirs and files: the
    next no-op compares those instead of walking, matching and hashing the context. A
    change that keeps size and mtime (content rewritten, mtime put back) still shows in
    the ctime; an added file in the directory's mtime."""
    ctx = build_context(tmp_path, CONTAINERFILE, {"app/main.py": "print(1)\n",
                                                  "app/lib/util.py": "x = 1\n"})
    _settled(ctx)
    args = ["build", "-q", "--build-arg", "GREETING=hi", "-t", "memo:3", str(ctx)]
    kb(*args)
    kb(*args)  # a no-op: leaves the memo, with the context's fingerprint
    [fingerprint] = _memo_fingerprints(broot)
    assert {e[0] for e in fingerprint["entries"]} >= {"", "app", "app/lib", "app/main.py",
                                                      "app/lib/util.py", "Containerfile"}
    assert _replayed(kb, args)  # from the fingerprint
    main = ctx / "app" / "main.py"
    st = os.stat(main)
    main.write_text("print(7)\n")  # same size
    os.utime(main, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the mtime put back
    assert not _replayed(kb, args)
    assert kb("run", "--rm", "memo:3", "cat", "/app/main.py").out == "print(7)\n"
    _settled(ctx)
    kb(*args)
    assert _replayed(kb, args)
    (ctx / "app" / "lib" / "new.py").write_text("y = 2\n")
    assert not _replayed(kb, args)
    assert kb("run", "--rm", "memo:3", "cat", "/app/lib/new.py").out == "y = 2\n"
