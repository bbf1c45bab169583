"""Issue 10.1: a container sharing a volume swaps a directory for a symlink while kiln makes
the mount points of other volumes inside it. kiln must never create (or mount) anything
outside the container's root, whatever the timing; and a volume onto an image symlink whose
target does not exist yet is made where the link points, inside the rootfs, as docker does."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import in_private_mount_ns

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def swapper(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("swapper") / "swapper"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(HERE / "swapper.c")], check=True)
    return out


class Swapping:
    """``volume``/a is a directory and ``volume``/b a symlink to ``outside`` (a host dir);
    while the context is open they trade places as fast as the kernel allows."""

    def __init__(self, swapper: Path, volume: Path, outside: Path):
        self.volume, self.outside = volume, outside
        (volume / "a").mkdir(parents=True)
        (volume / "b").symlink_to(outside)
        outside.mkdir()
        self.proc = subprocess.Popen([str(swapper), str(volume / "a"), str(volume / "b")])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def test_making_mount_points_by_fd_never_lands_outside_the_root(swapper, tmp_path):
    from runtime.rootfs import RootfsError, open_in_root

    root = tmp_path / "rootfs"
    outside = tmp_path / "host-dir"
    made = 0
    with Swapping(swapper, root / "vol", outside):
        deadline = time.monotonic() + 3
        i = 0
        while time.monotonic() < deadline:
            i += 1
            try:
                fd = open_in_root(str(root), f"/vol/a/m{i}/n/o", make="dir")
            except (RootfsError, OSError):
                continue  # the swap may make the path a link to a missing dir: a clean refusal
            os.close(fd)
            made += 1
            if any(outside.iterdir()):
                break
    assert not list(outside.iterdir()), f"created on the host: {list(outside.iterdir())}"
    assert made > 0
    # whatever the walk followed, it stayed inside the root: the link's target as a path there
    stray = [p for p in root.rglob("*") if not p.resolve().is_relative_to(root.resolve())
             and not p.is_symlink()]
    assert not stray


def test_volume_inside_a_shared_volume_under_attack(swapper, krun, tmp_path):
    shared = tmp_path / "shared"
    outside = tmp_path / "host-dir"
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "marker").write_text("inner\n")
    results = []
    with Swapping(swapper, shared, outside):
        for i in range(25):
            p = krun("cat", f"/vol/a/x{i}/y/marker",
                     opts=("-v", f"{shared}:/vol", "-v", f"{inner}:/vol/a/x{i}/y"))
            results.append(p)
            assert "Traceback" not in p.err
            # 1: cat lost the race (the swap moved /vol/a away under the container itself)
            assert p.returncode in (0, 1, 125), p.err
            if p.returncode == 125:  # refused cleanly: names container paths, not host ones
                assert str(tmp_path) not in p.err.replace(str(inner), "").replace(
                    str(shared), ""), p.err
    assert not list(outside.iterdir()), f"created on the host: {list(outside.iterdir())}"
    assert any(p.returncode == 0 and p.out == "inner\n" for p in results)


def test_volume_onto_a_dangling_image_symlink_makes_its_target_inside(krun, tmp_path,
                                                                     probe_rootfs):
    root = tmp_path / "rootfs"
    shutil.copytree(probe_rootfs, root, symlinks=True)
    (root / "link").symlink_to("/data/sub")  # /data does not exist in the image
    (root / "rel").symlink_to("data/rel/deeper")
    krun.cli("import", str(root), "danglers")
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "f").write_text("from the host\n")
    p = krun.cli("run", "--rm", "-v", f"{vol}:/link", "-v", f"{vol}:/rel", "danglers", "sh",
                 "-c", "cat /data/sub/f /link/f /data/rel/deeper/f; ls /", check=False)
    assert p.returncode == 0, p.err
    lines = p.out.splitlines()
    assert lines[:3] == ["from the host"] * 3
    assert "sub" not in lines[3:] and "deeper" not in lines[3:]  # no stray dirs at the top
    assert sorted(os.listdir(vol)) == ["f"]


def test_a_file_in_the_way_is_a_clear_error_in_container_terms(krun, tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    # /probe is a file in the image: a directory cannot be made below it
    p = krun("true", opts=("-v", f"{vol}:/probe/sub"))
    assert p.returncode == 125
    assert "/probe" in p.err and "not a directory" in p.err
    assert "rootfs" not in p.err and "Traceback" not in p.err


def test_classic_bind_remounts_the_new_mount_only_after_checking_it(tmp_path):
    """Kernels without mount_setattr bind then remount: the remount must reach the new mount,
    found again by fd, and never something swapped in meanwhile."""
    from runtime import rootfs
    from runtime import syscalls as sc

    root, src, other = tmp_path / "root", tmp_path / "src", tmp_path / "other"
    for d in (root / "t", src, other):
        d.mkdir(parents=True)

    def bind_ro(reopen_path) -> str:
        fd = rootfs.open_in_root(str(root), "/t")
        try:
            rootfs._bind_classic(str(src), fd, sc.MS_RDONLY,
                                 lambda: rootfs.open_in_root(str(root), reopen_path))
        except rootfs.RootfsError as e:
            return f"refused: {e}"
        finally:
            os.close(fd)
        try:
            (root / "t" / "f").write_text("x")
        except OSError as e:
            return f"write: {e.strerror}"
        return "writable"

    assert in_private_mount_ns(lambda: bind_ro("/t")) == "write: Read-only file system"
    (root / "elsewhere").mkdir()
    assert in_private_mount_ns(lambda: bind_ro("/elsewhere")).startswith("refused: ")
    assert not list(src.iterdir())


def test_cache_mount_source_is_made_by_fd_under_attack(swapper, tmp_path):
    """RUN --mount=type=cache,source=SUB: another step sharing the cache (sharing=shared is
    the default) can swap directories of it for symlinks while this step's SUB is made and
    bind-mounted. The sandbox makes it, by fd, in its own mount namespace."""
    from builder.mounts import MountSpec, cache_mount_dir, prepared_mounts
    from runtime.rootfs import mount_user_volumes
    from runtime.spec import ContainerSpec, ProcessSpec

    store_root = tmp_path / "store"
    cache = Path(cache_mount_dir(str(store_root), "shared-cache"))
    outside = tmp_path / "host-dir"
    root = tmp_path / "rootfs"
    root.mkdir()
    binds = []
    with Swapping(swapper, cache, outside):
        for i in range(300):
            spec = MountSpec(type="cache", target=f"/c{i}", source=f"a/m{i}/n",
                             id="shared-cache", readonly=False)
            with prepared_mounts([spec], {}, work=str(tmp_path / f"w{i}"),
                                 store_root=str(store_root), context_root=str(tmp_path),
                                 secrets={}) as out:
                binds.extend(out.binds)
        def mount_all() -> str:
            refused = 0
            for b in binds:
                try:
                    mount_user_volumes(ContainerSpec(id="x", layers=[], upper="", work="",
                                                     rootfs=str(root),
                                                     process=ProcessSpec(["true"]), binds=[b]),
                                       str(root))
                except Exception as e:  # a clean refusal when the swap left a dangling link
                    assert "Traceback" not in str(e)
                    refused += 1
            return str(refused)

        refused = int(in_private_mount_ns(mount_all))
    assert not list(outside.iterdir()), f"created on the host: {list(outside.iterdir())}"
    assert refused < len(binds)


def test_cache_mount_source_subdir_in_a_build(kb, tmp_path):
    from tests.builder.conftest import build_context

    ctx = build_context(tmp_path, "FROM busybox\n"
                        "RUN --mount=type=cache,target=/c,id=sub-test sh -c "
                        "'mkdir -p /c/deep/er && echo seeded > /c/deep/er/f'\n"
                        "RUN --mount=type=cache,target=/m,id=sub-test,source=deep/er "
                        "cat /m/f > /seen\n")
    kb("build", "-t", "subcache", str(ctx))
    assert kb("run", "--rm", "subcache", "cat", "/seen").out == "seeded\n"
