"""A kiln store on a tmpfs of its own, for attacks that fill a disk when they work: they
fill (at most) this one, never the machine's."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import KilnCLI


@contextmanager
def tmpfs_store(mount: Path, size: str, busybox_rootfs: Path) -> Iterator[KilnCLI]:
    """A store at ``mount``/root holding busybox, on a tmpfs of ``size`` (mount's -o size=)."""
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                    str(mount)], check=True)
    try:
        kiln = KilnCLI(mount / "root")
        kiln("import", str(busybox_rootfs), "busybox")
        yield kiln
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def tmpfs_store_fixtures(name: str, size: str):
    """(broot, kb) fixtures for a test module: a store root on its own tmpfs of ``size``
    (one per module), and a KilnCLI on it."""

    @pytest.fixture(scope="module")
    def broot(tmp_path_factory, busybox_rootfs):
        with tmpfs_store(tmp_path_factory.mktemp(name) / "store", size, busybox_rootfs) as k:
            yield k.root

    @pytest.fixture
    def kb(broot) -> KilnCLI:
        return KilnCLI(broot)

    return broot, kb
