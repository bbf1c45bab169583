"""What the build tests share: a store with the busybox base per test module, and a way to
write a build context."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import KilnCLI


@pytest.fixture(scope="module")
def broot(tmp_path_factory, busybox_rootfs) -> Path:
    """A store root holding busybox:latest, one per test module."""
    root = tmp_path_factory.mktemp("buildstore") / "root"
    KilnCLI(root)("import", str(busybox_rootfs), "busybox")
    return root


@pytest.fixture
def kb(broot) -> KilnCLI:
    return KilnCLI(broot)


def build_context(tmp_path: Path, containerfile: str,
                  files: dict[str, str | bytes] | None = None, name: str = "ctx") -> Path:
    """``tmp_path/name`` with a Containerfile and ``files`` (relative path -> content)."""
    ctx = tmp_path / name
    ctx.mkdir(exist_ok=True)
    (ctx / "Containerfile").write_text(containerfile)
    for rel, content in (files or {}).items():
        p = ctx / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    return ctx
