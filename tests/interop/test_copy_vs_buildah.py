"""COPY/ADD semantics where buildah 1.28 and Docker (BuildKit) agree: kiln's tree equals
buildah's for one Containerfile that follows source symlinks (from the context and from a
stage), copies another stage's owners, leaves existing destination directories as they are,
makes missing ones root 0755 (--chown's), follows destination symlinks to directories,
extracts an archive whose symlink points above its destination, and keeps extended
attributes (user.*, security.capability).

Where they differ, kiln follows BuildKit and tests/builder/test_copy_semantics.py checks it
alone: a destination symlink to a file (BuildKit writes its target, buildah replaces the
link), a symlink and a directory in each other's way below the destination (BuildKit fails,
buildah replaces), an archive symlink that climbs above the image's root (both keep it,
clamped; kiln refuses it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import tar_of
from tests.interop.conftest import (
    busybox_in_kiln_and_buildah,
    differences,
    require_tool,
    run_tool,
    tree_view,
    umoci_unpack,
)

pytestmark = pytest.mark.interop

CONTAINERFILE = """\
FROM busybox AS builder
RUN mkdir /src && echo art > /src/artifact && chmod 640 /src/artifact \\
 && chown 123:456 /src/artifact && ln -s artifact /src/link && chown -h 9:9 /src/link \\
 && mkdir /src/d && echo in > /src/d/x && chown 7:8 /src/d /src/d/x && chmod 700 /src/d \\
 && ln -s /src/d /src/dl && ln -s ../src/d/x /src/rel && ln -s d /src/via \\
 && chown 5:5 /src && chmod 751 /src
COPY caps /src/caps
FROM busybox
COPY --from=builder /src/link /app/link
COPY --from=builder /src/dl /app2/
COPY --from=builder /src/rel /src/via/x /app3/
COPY --from=builder /src/l* /app4/
COPY --from=builder /src /tree
COPY link /c1/
COPY link /c2
COPY dlink /c3/
COPY pdir/f /c4/
COPY l* /c5/
COPY abs /c6
COPY tree /c7/
COPY caps /c8/
RUN mkdir -p /e1 /e2 /e3 /tgt && chown 5:5 /e1 && chmod 700 /e1 && chown 6:6 /e2 \\
 && chmod 711 /e2 && chown 7:7 /e3 && chmod 750 /e3 && ln -s /tgt /t1 && ln -s /tgt /t2
COPY real.txt /e1/
COPY realdir/ /e2/
COPY --from=builder /src/d /e3
COPY --chown=11:12 real.txt /new/deep/f
COPY --chown=11:12 --from=builder /src/d /owned/er/
COPY real.txt /t1
COPY realdir /t2
ADD a.tar /x/
RUN mkdir -p /p/q
ADD a.tar /p/q/
"""


def _context(where: Path) -> Path:
    ctx = where / "copy-ctx"
    (ctx / "realdir").mkdir(parents=True)
    (ctx / "tree").mkdir()
    (ctx / "Containerfile").write_text(CONTAINERFILE)
    for name, text in (("real.txt", "real\n"), ("realdir/f", "in dir\n"), ("tree/t.txt", "t\n"),
                       ("caps", "#!/bin/sh\n")):
        (ctx / name).write_text(text)
    os.chmod(ctx / "caps", 0o755)
    (ctx / "a.tar").write_bytes(tar_of([("symldir1", "sym", ".."),
                                        ("symldir1/file", "file", b"hello\n")]))
    for link, target in (("link", "real.txt"), ("dlink", "realdir"), ("pdir", "realdir"),
                         ("abs", "/real.txt"), ("tree/inside", "t.txt")):
        os.symlink(target, ctx / link)
    setcap = shutil.which("setcap") or "/sbin/setcap"
    if not os.path.exists(setcap):
        pytest.fail("setcap is not installed (libcap2-bin; tests/setup-and-run.sh installs it)")
    subprocess.run([setcap, "cap_net_raw+ep", str(ctx / "caps")], check=True)
    try:
        os.setxattr(ctx / "caps", "user.kiln.origin", b"context")
    except OSError:
        pass  # a file system without user xattrs: the capability is still compared
    return ctx


@pytest.fixture(scope="module")
def trees(container_tools, busybox_rootfs, tmp_path_factory) -> dict[str, dict]:
    """{"kiln": tree_view, "buildah": tree_view} of the Containerfile's image."""
    tools = container_tools
    work = tmp_path_factory.mktemp("copy-vs-buildah")
    ctx = _context(work)
    ref = "localhost/copy-semantics:latest"
    with busybox_in_kiln_and_buildah(tools, busybox_rootfs, work) as kiln:
        kiln("build", "-q", "--network", "none", "-t", ref, str(ctx))
        kiln("save", "-q", ref, "-o", str(work / "kiln-layout"), "--format", "oci",
             "--compression-format", "gzip")
        tools.buildah("bud", "--runtime", "/usr/sbin/runc", "--layers", "--pull=never",
                      "--network", "none", "-q", "-t", ref, str(ctx))
        tools.skopeo("--insecure-policy", "copy", tools.storage_ref(ref),
                     f"oci:{work / 'buildah-layout'}:{ref}")
    out = {}
    for who in ("kiln", "buildah"):
        run_tool([require_tool("skopeo"), "inspect", f"oci:{work / f'{who}-layout'}:{ref}"])
        rootfs = umoci_unpack(work / f"{who}-layout", ref, work / f"{who}-bundle")
        # mtimes: buildah keeps the build host's, kiln its layers'; not compared
        out[who] = {p: v[:5] for p, v in tree_view(rootfs).items()}
    # buildah's RUN steps leave the mount points they bind over (empty /etc/hosts ...)
    for stub in ("run/.containerenv", "run", "etc/hostname", "etc/hosts", "etc/resolv.conf"):
        if stub not in out["kiln"]:
            out["buildah"].pop(stub, None)
    return out


def test_copy_semantics_equal_buildahs(trees):
    unlike = differences(trees["kiln"], trees["buildah"], got_by="kiln", want_by="buildah")
    assert not unlike, "kiln's tree differs from buildah's:\n" + "\n".join(unlike)


def test_the_comparison_is_not_vacuous(trees):
    kiln = trees["kiln"]
    assert kiln["app/link"][:3] == ("0o100640", 123, 456)   # followed, owner kept
    assert kiln["tree/link"][3] == "artifact"               # a symlink inside stays one
    assert kiln["c2"][0] == "0o100644" and kiln["c3/f"][0] == "0o100644"
    assert kiln["e1"][:3] == ("0o40700", 5, 5) and kiln["owned/er"][:3] == ("0o40755", 11, 12)
    assert kiln["x/symldir1"][3] == ".." and "x/file" in kiln and "tgt/f" in kiln
    caps = dict(kiln["c8/caps"][4])
    assert "security.capability" in caps and "security.capability" in dict(
        kiln["tree/caps"][4])
    assert json.dumps(sorted(trees["buildah"])) == json.dumps(sorted(kiln))
