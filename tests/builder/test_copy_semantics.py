"""COPY/ADD as Docker (BuildKit) does them, checked on real builds: symlinks on a source's
path are followed, COPY --from keeps owners, existing destination directories keep theirs,
entries replace what is in their way, archives may hold links above their destination,
extended attributes come along, and a context symlink that leads out of the context is an
error that says so.

References: the Dockerfile reference (COPY, ADD); BuildKit's copy (tonistiigi/fsutil
copy/copy.go: FollowLinks, prepareTargetDir, copyDirectory, copyFileInfo, copyXAttrs);
moby/moby#38599 (COPY --from keeps ownership).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.builder.conftest import build_context as _ctx
from tests.conftest import KilnCLI, tar_of, user_xattrs_work


def _run(kb, image: str, script: str) -> str:
    return kb("run", "--rm", image, "sh", "-c", script).out


def _stat(kb, image: str, *paths: str) -> list[str]:
    """``stat`` of each path in the image: name, type, mode, owner (and a link's target)."""
    out = _run(kb, image, "stat -c '%N|%F|%a|%u:%g' " + " ".join(paths))
    return out.splitlines()


# A stage whose files have owners, modes and symlinks of their own.
BUILDER = """\
FROM busybox AS builder
RUN mkdir /src && echo art > /src/artifact && chmod 640 /src/artifact \\
 && chown 123:456 /src/artifact && ln -s artifact /src/link && chown -h 9:9 /src/link \\
 && mkdir /src/d && echo in > /src/d/x && chown 7:8 /src/d /src/d/x && chmod 700 /src/d \\
 && ln -s /src/d /src/dl && ln -s ../src/d/x /src/rel && ln -s d /src/via \\
 && chown 5:5 /src && chmod 751 /src
"""


# -- 2: a source's own symlinks are followed ---------------------------------------------------
def test_copy_from_a_stage_follows_the_source_symlinks(kb, tmp_path):
    cf = BUILDER + """\
FROM busybox
COPY --from=builder /src/link /app/link
COPY --from=builder /src/dl /app2/
COPY --from=builder /src/rel /src/via/x /app3/
COPY --from=builder /src/l* /app4/
COPY --from=builder /src /tree
"""
    kb("build", "-t", "follow:1", str(_ctx(tmp_path, cf)))
    assert _stat(kb, "follow:1", "/app/link", "/app2/x", "/app3/rel", "/app3/x",
                 "/app4/link") == [
        "/app/link|regular file|640|123:456",  # the file the link points to, named as the link
        "/app2/x|regular file|644|7:8",         # a linked directory's contents
        "/app3/rel|regular file|644|7:8",       # a relative link, resolved in the stage
        "/app3/x|regular file|644|7:8",         # a parent that is a symlink
        "/app4/link|regular file|640|123:456",  # a glob's match is followed too
    ]
    assert _run(kb, "follow:1", "cat /app/link /app3/rel") == "art\nin\n"
    # symlinks inside a copied directory stay symlinks, with their own owner
    assert _stat(kb, "follow:1", "/tree/link", "/tree/dl", "/tree/rel") == [
        "'/tree/link' -> 'artifact'|symbolic link|777|9:9",
        "'/tree/dl' -> '/src/d'|symbolic link|777|0:0",
        "'/tree/rel' -> '../src/d/x'|symbolic link|777|0:0",
    ]


def test_copy_from_the_context_follows_the_source_symlinks(kb, tmp_path):
    cf = ("FROM busybox\nCOPY link /c1/\nCOPY link /c2\nCOPY dlink /c3/\nCOPY pdir/f /c4/\n"
          "COPY l* /c5/\nCOPY abs /c6\nCOPY tree /c7/\n")
    ctx = _ctx(tmp_path, cf, {"real.txt": "real\n", "realdir/f": "in dir\n",
                              "tree/t.txt": "t\n"})
    os.symlink("real.txt", ctx / "link")
    os.symlink("realdir", ctx / "dlink")
    os.symlink("realdir", ctx / "pdir")
    os.symlink("/real.txt", ctx / "abs")  # absolute: read inside the context, as BuildKit
    os.symlink("t.txt", ctx / "tree" / "inside")
    kb("build", "-t", "cfollow:1", str(ctx))
    assert _stat(kb, "cfollow:1", "/c1/link", "/c2", "/c3/f", "/c4/f", "/c5/link", "/c6",
                 "/c7/inside") == [
        "/c1/link|regular file|644|0:0", "/c2|regular file|644|0:0",
        "/c3/f|regular file|644|0:0", "/c4/f|regular file|644|0:0",
        "/c5/link|regular file|644|0:0", "/c6|regular file|644|0:0",
        "'/c7/inside' -> 't.txt'|symbolic link|777|0:0",
    ]
    assert _run(kb, "cfollow:1", "cat /c1/link /c3/f /c6") == "real\nin dir\nreal\n"
    assert "/c5/dlink" not in _run(kb, "cfollow:1", "find /c5")  # l* matched link only

    # the link is part of the step's key: pointed elsewhere, the step runs again
    (ctx / "other.txt").write_text("other\n")
    os.unlink(ctx / "link")
    os.symlink("other.txt", ctx / "link")
    kb("build", "-t", "cfollow:2", str(ctx))
    assert _run(kb, "cfollow:2", "cat /c1/link /c2") == "other\nother\n"


# -- 10 (part): a context symlink that leads out of the context --------------------------------
@pytest.mark.parametrize("link,target,copy", [
    ("out", "/etc/hostname", "COPY out /o"),
    ("up", "../secret.txt", "COPY up /o"),
    ("outdir", "../..", "COPY outdir/etc/passwd /o"),
    ("globbed", "/etc/passwd", "COPY glob* /o/"),
], ids=["absolute", "relative", "parent", "glob"])
def test_a_context_symlink_out_of_the_context_is_an_error(kb, tmp_path, link, target, copy):
    (tmp_path / "secret.txt").write_text("host secret\n")  # next to the context, on the host
    ctx = _ctx(tmp_path, f"FROM busybox\n{copy}\n")
    os.symlink(target, ctx / link)
    p = kb("build", "-t", "escape:1", str(ctx), check=False)
    assert p.returncode == 125, p.err
    assert "Containerfile:2: COPY source" in p.err and "points outside the build context" in p.err
    assert f"{link} -> {target}" in p.err and "Traceback" not in p.err
    assert "escape" not in kb("images").out


# -- 3: owners -------------------------------------------------------------------------------
def test_copy_from_keeps_owners_and_made_directories_are_root_0755(kb, tmp_path):
    cf = BUILDER + """\
FROM busybox
COPY --from=builder /src /app
COPY --from=builder /src/d /deep/er/d2
COPY --chown=11:12 --from=builder /src/d /owned/er/
COPY --chown=11:12 f /new/deep/f
COPY f /ctx/f
"""
    kb("build", "-t", "own:1", str(_ctx(tmp_path, cf, {"f": "f\n"})))
    assert _stat(kb, "own:1", "/app", "/app/artifact", "/app/d", "/app/d/x", "/deep",
                 "/deep/er", "/deep/er/d2", "/deep/er/d2/x", "/owned", "/owned/er",
                 "/owned/er/x", "/new", "/new/deep", "/new/deep/f", "/ctx/f") == [
        "/app|directory|755|0:0",  # made by the copy: not the source's 751 5:5
        "/app/artifact|regular file|640|123:456",
        "/app/d|directory|700|7:8",
        "/app/d/x|regular file|644|7:8",
        "/deep|directory|755|0:0", "/deep/er|directory|755|0:0",
        "/deep/er/d2|directory|755|0:0",
        "/deep/er/d2/x|regular file|644|7:8",
        "/owned|directory|755|11:12", "/owned/er|directory|755|11:12",  # --chown's user
        "/owned/er/x|regular file|644|11:12",
        "/new|directory|755|11:12", "/new/deep|directory|755|11:12",
        "/new/deep/f|regular file|644|11:12",
        "/ctx/f|regular file|644|0:0",  # context files are root's
    ]


# -- 4: an existing destination directory keeps its owner and mode ----------------------------
def test_copy_into_an_existing_directory_keeps_its_owner_and_mode(kb, tmp_path):
    cf = BUILDER + """\
FROM busybox
RUN mkdir -p /e1 /e2 /e3 /e4/sub && chown 5:5 /e1 && chmod 700 /e1 && chown 6:6 /e2 \\
 && chmod 711 /e2 && chown 7:7 /e3 && chmod 750 /e3 && chown 8:8 /e4/sub && chmod 700 /e4/sub
COPY f /e1/
COPY dir/ /e2/
COPY --from=builder /src/d /e3
COPY dir /e4/
"""
    ctx = _ctx(tmp_path, cf, {"f": "f\n", "dir/g": "g\n", "dir/sub/h": "h\n"})
    os.chmod(ctx / "dir", 0o700)
    os.chmod(ctx / "dir" / "sub", 0o750)
    os.utime(ctx / "dir", (1_500_000_000, 1_500_000_000))
    kb("build", "-t", "exist:1", str(ctx))
    assert _stat(kb, "exist:1", "/e1", "/e2", "/e3", "/e4", "/e4/sub", "/e3/x") == [
        "/e1|directory|700|5:5", "/e2|directory|711|6:6", "/e3|directory|750|7:7",
        "/e4|directory|755|0:0",
        "/e4/sub|directory|750|0:0",  # inside the copied tree: the source's mode (BuildKit)
        "/e3/x|regular file|644|7:8",
    ]
    # the destination directory takes the source directory's time (BuildKit's copy)
    assert _run(kb, "exist:1", "stat -c %Y /e2") == "1500000000\n"


# -- 5: what is in the way -------------------------------------------------------------------
def test_the_destination_symlinks_are_followed_and_files_replace_files(kb, tmp_path):
    cf = """\
FROM busybox
RUN mkdir -p /tgt /m && echo old > /tf && ln -s /tgt /t1 && ln -s /tgt /t2 && ln -s /tf /t3 \\
 && ln -s /nowhere /t4 && echo old > /m/file && ln -s /tf /m/link && echo old > /m/swap
COPY f /t1
COPY dir /t2
COPY f /t3
COPY f /t4
COPY md/ /m/
"""
    ctx = _ctx(tmp_path, cf, {"f": "new\n", "dir/g": "g\n", "md/file": "md file\n",
                              "md/link": "md link\n", "md/other": "o\n"})
    os.symlink("other", ctx / "md" / "swap")
    kb("build", "-t", "way:1", str(ctx))
    # BuildKit resolves the destination as written inside the image (fs.RootPath): a link to
    # a directory takes the copy into it, a link to a file (or to nothing) has what it points
    # to written, the link itself stays
    assert _stat(kb, "way:1", "/t1", "/t2", "/tgt/f", "/tgt/g", "/t3", "/t4", "/nowhere") == [
        "'/t1' -> '/tgt'|symbolic link|777|0:0", "'/t2' -> '/tgt'|symbolic link|777|0:0",
        "/tgt/f|regular file|644|0:0", "/tgt/g|regular file|644|0:0",
        "'/t3' -> '/tf'|symbolic link|777|0:0", "'/t4' -> '/nowhere'|symbolic link|777|0:0",
        "/nowhere|regular file|644|0:0",
    ]
    assert _run(kb, "way:1", "cat /tf /nowhere") == "new\nnew\n"
    # inside a copied directory a file replaces a file or a symlink (never followed), and a
    # symlink replaces a file
    assert _stat(kb, "way:1", "/m/file", "/m/link", "/m/swap") == [
        "/m/file|regular file|644|0:0", "/m/link|regular file|644|0:0",
        "'/m/swap' -> 'other'|symbolic link|777|0:0",
    ]
    assert _run(kb, "way:1", "cat /m/link /tf") == "md link\nnew\n"


@pytest.mark.parametrize("setup,copy,files,message", [
    # a symlink inside a copied directory where the image has a directory
    ("mkdir -p /n/x/sub", "COPY nd/ /n/", {"nd/.keep": ""},
     "cannot copy nd/x to /n/x: /n/x is a directory in the image"),
    # a directory inside a copied one where the image has a symlink (a usrmerged /bin)
    ("mkdir -p /usr/sbin2 && ln -s usr/sbin2 /sbin2", "COPY rootfs /",
     {"rootfs/sbin2/tool": "t"}, "cannot copy the directory rootfs/sbin2 to /sbin2: /sbin2 "
     "is a symlink in the image"),
    # a file named after its source where the image has a directory of that name
    ("mkdir -p /dd/f", "COPY f /dd/", {"f": "f"},
     "cannot copy f to /dd/f: /dd/f is a directory in the image"),
    # a directory source onto a file
    ("echo x > /app", "COPY dir /app", {"dir/g": "g"},
     "cannot copy a directory to /app: it is not a directory in the image"),
], ids=["symlink-over-dir", "dir-over-symlink", "file-over-dir", "dir-onto-file"])
def test_one_kind_never_replaces_the_other_as_buildkit(kb, tmp_path, setup, copy, files,
                                                        message):
    # BuildKit's copy refuses these ("cannot replace to directory ... with file", "cannot copy
    # to non-directory", moby/buildkit#2626); the classic builder and buildah replace, which
    # moby/moby#41035 calls a bug (a usrmerged /bin symlink became a directory)
    ctx = _ctx(tmp_path, f"FROM busybox\nRUN {setup}\n{copy}\n", files)
    if "nd/" in copy:
        os.symlink("y", ctx / "nd" / "x")
    p = kb("build", "-t", "inway:1", str(ctx), check=False)
    assert p.returncode == 125 and "Containerfile:3" in p.err and message in p.err, p.err
    assert "Traceback" not in p.err and "inway" not in kb("images").out


# -- 7: archives with symlinks above their destination -----------------------------------------
def test_add_archive_with_a_symlink_above_its_destination(kb, tmp_path):
    # docker extracts chrooted at the destination: the link is kept as it is, names through
    # it resolve inside the destination (/x/file, not /file)
    archive = tar_of([("symldir1", "sym", ".."), ("symldir1/file", "file", b"hello\n"),
                      ("deep", "sym", "../q/s"), ("deep/f2", "file", b"deep\n")])
    ctx = _ctx(tmp_path, "FROM busybox\nADD a.tar /x/\nRUN mkdir -p /p/q\nADD a.tar /p/q/\n",
               {"a.tar": archive})
    kb("build", "-t", "symld:1", str(ctx))
    assert _stat(kb, "symld:1", "/x/symldir1", "/x/file", "/x/deep", "/x/q/s/f2",
                 "/p/q/symldir1", "/p/q/file", "/p/q/q/s/f2") == [
        "'/x/symldir1' -> '..'|symbolic link|777|0:0", "/x/file|regular file|644|0:0",
        "'/x/deep' -> '../q/s'|symbolic link|777|0:0", "/x/q/s/f2|regular file|644|0:0",
        "'/p/q/symldir1' -> '..'|symbolic link|777|0:0", "/p/q/file|regular file|644|0:0",
        "/p/q/q/s/f2|regular file|644|0:0",
    ]
    assert _run(kb, "symld:1", "cat /x/file /p/q/q/s/f2; test -e /file || echo none") == \
        "hello\ndeep\nnone\n"


def test_add_archive_symlink_above_the_image_root_is_refused(kb, tmp_path):
    archive = tar_of([("up", "sym", "../.."), ("up/etc/escaped", "file", b"x\n")])
    ctx = _ctx(tmp_path, "FROM busybox\nADD a.tar /x/\n", {"a.tar": archive})
    p = kb("build", str(ctx), check=False)
    assert p.returncode == 125 and "Containerfile:2" in p.err
    assert "symlink up -> ../.. points outside of the image's root" in p.err


# -- 8: extended attributes ------------------------------------------------------------------
def _setcap(path: Path) -> bytes:
    setcap = shutil.which("setcap") or "/sbin/setcap"
    if not os.path.exists(setcap):
        pytest.fail("setcap is not installed (libcap2-bin; tests/setup-and-run.sh installs it)")
    subprocess.run([setcap, "cap_net_raw+ep", str(path)], check=True)
    return os.getxattr(path, "security.capability")


def _layer_file(kiln: KilnCLI, image: str, path: str, layer: int = -1) -> Path:
    """``path`` in the unpacked dir of the image's ``layer`` (base first)."""
    diff_id = json.loads(kiln("inspect", image).out)[0]["Layers"][layer]["DiffID"]
    return kiln.root / "layers" / diff_id.split(":")[1] / "diff" / path


def test_copy_keeps_xattrs_into_the_layer_tar_and_a_loaded_image(kb, broot, tmp_path):
    cf = ("FROM busybox AS stage\nCOPY ping /bin/kping\nFROM busybox\n"
          "COPY --from=stage /bin/kping /usr/bin/kping\nCOPY ping /bin/kping\n")
    ctx = _ctx(tmp_path, cf, {"ping": "#!/bin/sh\necho ping\n"})
    os.chmod(ctx / "ping", 0o755)
    caps = _setcap(ctx / "ping")
    user = user_xattrs_work(tmp_path)
    if user:
        os.setxattr(ctx / "ping", "user.kiln.origin", b"context")
    kb("build", "-t", "caps:1", str(ctx))

    want = {"security.capability": caps, **({"user.kiln.origin": b"context"} if user else {})}
    # from the context (the last layer), and from a stage (the one below)
    for path, layer in (("bin/kping", -1), ("usr/bin/kping", -2)):
        f = _layer_file(kb, "caps:1", path, layer)
        assert {x: os.getxattr(f, x) for x in os.listxattr(f)} == want, path

    # the layer tar carries them (PAX SCHILY.xattr), and an image loaded from it has them
    out = tmp_path / "saved"
    kb("save", "-q", "caps:1", "-o", str(out), "--format", "oci", "--compression-format", "gzip")
    manifest_digest = json.loads((out / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((out / "blobs" / "sha256" / manifest_digest[7:]).read_bytes())
    headers = {}
    for layer in manifest["layers"][-2:]:
        with tarfile.open(out / "blobs" / "sha256" / layer["digest"][7:], "r:gz") as t:
            headers.update({m.name: m.pax_headers for m in t if m.name.endswith("bin/kping")})
    for name in ("bin/kping", "usr/bin/kping"):
        got = {k[len("SCHILY.xattr."):]: v for k, v in headers[name].items()
               if k.startswith("SCHILY.xattr.")}
        assert got.keys() == want.keys(), name
    other = KilnCLI(tmp_path / "other-root")
    other("load", "-q", "-i", str(out))
    loaded = _layer_file(other, "caps:1", "bin/kping")
    assert os.getxattr(loaded, "security.capability") == caps
