"""Real containers from a busybox image made by `kiln import`, plus a static probe binary."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT, KilnCLI

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def probe_rootfs(busybox_rootfs, tmp_path_factory) -> Path:
    if not shutil.which("gcc"):
        pytest.fail("gcc is needed to build the probe (tests/setup-and-run.sh installs it)")
    root = tmp_path_factory.mktemp("probe") / "rootfs"
    shutil.copytree(busybox_rootfs, root, symlinks=True)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(root / "probe"), str(HERE / "probe.c")],
                   check=True)
    shutil.copy2(root / "probe", root / "suid-probe")
    os.chown(root / "suid-probe", 0, 0)
    os.chmod(root / "suid-probe", 0o4755)
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
        "app:x:1000:1000:app:/home/app:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1000:\nextra:x:2000:app\n"
                                        "nogroup:x:65534:\n")
    (root / "etc" / "escape").symlink_to("/")  # a symlink that would lead a mount to the host
    (root / "notexec").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "notexec", 0o644)
    return root


@pytest.fixture(scope="session")
def run_root(tmp_path_factory, probe_rootfs) -> Path:
    root = tmp_path_factory.mktemp("runstore") / "root"
    cli = KilnCLI(root)
    cli("import", str(probe_rootfs), "probe")
    return root


@pytest.fixture
def krun(run_root):
    """`kiln run --rm probe ...` -> CompletedProcess with .out/.err."""
    cli = KilnCLI(run_root)

    def go(*args: str, opts: tuple[str, ...] = (), check: bool = False, **kw):
        return cli("run", "--rm", *opts, "probe", *args, check=check, **kw)

    go.cli = cli
    return go


def kiln_argv(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "kiln", "--root", str(root), *args]


__all__ = ["PROJECT", "kiln_argv"]
