"""A COPY rerun after a few context files changed hardlinks the unchanged files from its
earlier layer (builder.reuse) and still makes exactly the layer a fresh copy makes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from store.store import Store
from tests.builder.conftest import build_context
from tests.conftest import KilnCLI, user_xattrs_work

CONTAINERFILE = "FROM busybox\nWORKDIR /src\nCOPY . .\nCOPY keep/ /other/\n"
STAMP = "1700000000"


def _context(tmp_path: Path, name: str) -> Path:
    """Contents differ by ``name``: each test's first build is a cache miss."""
    files = {f"pkg{i % 4}/mod{i}.py": f"{name} = {i}\n" * (i + 1) for i in range(40)}
    files.update({"keep/a.txt": "a\n", "keep/b.txt": "b\n", "tool.sh": "#!/bin/sh\necho hi\n"})
    ctx = build_context(tmp_path, CONTAINERFILE, files)
    (ctx / "tool.sh").chmod(0o755)
    (ctx / "pkg0" / "link").symlink_to("mod0.py")
    return ctx


def _copy_layer(root: Path, tag: str, index: int = -2) -> tuple[str, Path]:
    store = Store(root)
    diff_id = store.image(tag).config()["rootfs"]["diff_ids"][index]
    return diff_id, store.layer_dir(diff_id)


def _fresh_build(tmp_path: Path, busybox_rootfs: Path, ctx: Path) -> list[str]:
    fresh = KilnCLI(tmp_path / "fresh-root")
    fresh("import", str(busybox_rootfs), "busybox")
    fresh("build", "-q", "--timestamp", STAMP, "-t", "fresh:1", str(ctx))
    return Store(tmp_path / "fresh-root").image("fresh:1").config()["rootfs"]["diff_ids"]


def test_copy_after_small_changes_links_the_rest_and_equals_a_fresh_copy(
        kb, broot, tmp_path, busybox_rootfs):
    ctx = _context(tmp_path, "reuse")
    xattrs = user_xattrs_work(ctx)
    if xattrs:
        os.setxattr(ctx / "pkg2" / "mod2.py", "user.origin", b"one")
    kb("build", "-q", "--timestamp", STAMP, "-t", "reuse:1", str(ctx))
    _, first = _copy_layer(broot, "reuse:1")

    # every kind of change a rebuild must see, each on its own file
    with open(ctx / "pkg1" / "mod1.py", "a") as f:
        f.write("edited = True\n")  # content
    (ctx / "pkg1" / "mod5.py").chmod(0o600)  # mode only
    os.utime(ctx / "pkg1" / "mod9.py", (1_600_000_000, 1_600_000_000))  # mtime only
    (ctx / "pkg3" / "mod3.py").unlink()  # gone
    (ctx / "pkg3" / "new.py").write_text("new = 1\n")  # new
    (ctx / "pkg0" / "link").unlink()
    (ctx / "pkg0" / "link").symlink_to("mod4.py")  # a symlink retargeted
    if xattrs:
        os.setxattr(ctx / "pkg2" / "mod2.py", "user.origin", b"two")  # xattr only
    kb("build", "-q", "--timestamp", STAMP, "-t", "reuse:2", str(ctx))
    diff_id, second = _copy_layer(broot, "reuse:2")

    # the same layer, byte for byte, as a build in a store that never saw the context
    diff_ids = Store(broot).image("reuse:2").config()["rootfs"]["diff_ids"]
    assert diff_ids == _fresh_build(tmp_path, busybox_rootfs, ctx)
    assert diff_id != _copy_layer(broot, "reuse:1")[0]

    # unchanged files are the earlier layer's (one inode in two layers), changed ones new
    def inode(layer: Path, rel: str) -> int:
        return os.lstat(layer / "src" / rel).st_ino

    for rel in ("pkg0/mod0.py", "pkg2/mod6.py", "tool.sh", "Containerfile"):
        assert inode(second, rel) == inode(first, rel), rel
    changed = ["pkg1/mod1.py", "pkg1/mod5.py", "pkg1/mod9.py"] + (["pkg2/mod2.py"] if xattrs
                                                                  else [])
    for rel in changed:
        assert inode(second, rel) != inode(first, rel), rel
    assert not (second / "src" / "pkg3" / "mod3.py").exists()
    assert os.readlink(second / "src" / "pkg0" / "link") == "mod4.py"

    out = kb("run", "--rm", "reuse:2", "sh", "-c",
             "tail -1 /src/pkg1/mod1.py; stat -c %a /src/pkg1/mod5.py /src/tool.sh; "
             "cat /src/pkg3/new.py; ls /src/pkg3 | grep -c mod3.py; cat /other/a.txt").out
    assert out == "edited = True\n600\n755\nnew = 1\n0\na\n"


def test_no_cache_copies_every_file(kb, broot, tmp_path):
    ctx = _context(tmp_path, "nocache")
    kb("build", "-q", "-t", "nocache:1", str(ctx))
    (ctx / "pkg1" / "mod1.py").write_text("changed\n")
    kb("build", "-q", "--no-cache", "-t", "nocache:2", str(ctx))
    _, layer = _copy_layer(broot, "nocache:2")
    assert os.lstat(layer / "src" / "pkg0" / "mod0.py").st_nlink == 1


def test_a_pruned_earlier_layer_means_a_plain_copy(kb, broot, tmp_path):
    ctx = _context(tmp_path, "pruned")
    kb("build", "-q", "-t", "pruned:1", str(ctx))
    _, first = _copy_layer(broot, "pruned:1")
    kb("rmi", "pruned:1")
    kb("prune", "--build-cache")
    assert not first.exists()
    (ctx / "pkg1" / "mod1.py").write_text("changed\n")
    kb("build", "-q", "-t", "pruned:2", str(ctx))
    _, layer = _copy_layer(broot, "pruned:2")
    assert os.lstat(layer / "src" / "pkg0" / "mod0.py").st_nlink == 1
    assert kb("run", "--rm", "pruned:2", "cat", "/src/pkg1/mod1.py").out == "changed\n"


def _deferred(tmp_path: Path, earlier_dir: Path) -> tuple:
    from builder.reuse import FileReuse

    src = tmp_path / "src.txt"
    src.write_text("content\n")
    os.utime(src, (1_600_000_000, 1_600_000_000))
    upper = tmp_path / "upper"
    (upper / "app").mkdir(parents=True)
    reuse = FileReuse({"src.txt": "sha256:x"}, earlier_dir=str(earlier_dir), upper=str(upper))
    reuse.deferred["app/f.txt"] = (str(src), 0o640, 12, 34, None)
    return reuse, upper


def test_a_file_the_earlier_layer_lost_is_copied_instead(tmp_path):
    reuse, upper = _deferred(tmp_path, tmp_path / "pruned-layer")
    reuse.link_into()
    st = os.lstat(upper / "app" / "f.txt")
    assert (upper / "app" / "f.txt").read_text() == "content\n"
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_mtime) == (0o640, 12, 34,
                                                                       1_600_000_000)


def test_links_never_follow_a_symlink_out_of_the_new_layer(tmp_path):
    from builder.sources import CopyError

    earlier = tmp_path / "earlier"
    (earlier / "app").mkdir(parents=True)
    (earlier / "app" / "f.txt").write_text("content\n")
    reuse, upper = _deferred(tmp_path, earlier)
    outside = tmp_path / "outside"
    outside.mkdir()
    (upper / "app").rmdir()
    (upper / "app").symlink_to(outside)
    with pytest.raises(CopyError, match="app/f.txt"):
        reuse.link_into()
    assert list(outside.iterdir()) == []


FLAG_CASES = {
    "chown-chmod": "FROM busybox\nCOPY --chown=1000:2000 --chmod=640 src/ /app/\n",
    "exclude": "FROM busybox\nCOPY --exclude=*.log src/ /app/\n",
    "parents": "FROM busybox\nCOPY --parents src/**/*.py /app/\n",
    # /app is in the image (copied up for the links), and src/a.py replaces a file there
    "into-image-dir": "FROM busybox\nRUN mkdir -p /app && echo base > /app/keep && "
                      "echo old > /app/a.py\nCOPY src/ /app/\n",
}


def test_reuse_under_copy_flags_equals_a_fresh_copy(kb, broot, tmp_path, busybox_rootfs):
    files = {f"src/d{i % 3}/m{i}.py": f"flags {i}\n" * (i + 1) for i in range(24)}
    files.update({"src/a.py": "a\n", "src/skip.log": "log\n", "src/d0/x.log": "x\n"})
    for name, containerfile in FLAG_CASES.items():
        ctx = build_context(tmp_path, containerfile, files, name=name)
        (ctx / ".dockerignore").write_text("src/d2/m5.py\n")
        kb("build", "-q", "--timestamp", STAMP, "-t", f"flags-{name}:1", str(ctx))
        with open(ctx / "src" / "d1" / "m1.py", "a") as f:
            f.write("edited\n")
        (ctx / "src" / "a.py").write_text("a, edited\n")
        kb("build", "-q", "--timestamp", STAMP, "-t", f"flags-{name}:2", str(ctx))
        built = Store(broot).image(f"flags-{name}:2").config()["rootfs"]["diff_ids"]
        fresh = KilnCLI(tmp_path / f"fresh-{name}")
        fresh("import", str(busybox_rootfs), "busybox")
        fresh("build", "-q", "--timestamp", STAMP, "-t", "fresh:1", str(ctx))
        assert built == Store(tmp_path / f"fresh-{name}").image("fresh:1").config()[
            "rootfs"]["diff_ids"], name
        _, first = _copy_layer(broot, f"flags-{name}:1", -1)
        _, second = _copy_layer(broot, f"flags-{name}:2", -1)
        shared = [p for p in second.rglob("m*.py")
                  if os.lstat(p).st_ino == os.lstat(first / p.relative_to(second)).st_ino]
        assert len(shared) >= 20, name  # all but the edited file were linked
        edited = next(second.rglob("m1.py"))
        assert edited.read_text().endswith("edited\n") and edited not in shared
