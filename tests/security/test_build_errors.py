"""Issue 10, point 7 (the builder's part): clear errors, never tracebacks.

A store on a full disk, met while COPY writes its files and while the commit thread
writes the step's layer, must fail the build with the step's file:line, exit 125, and
leave nothing half-written in the store. A COPY --from source that a stage or image lacks
says where it was looked for."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.builder.conftest import build_context
from tests.security.tmpfs import tmpfs_store


@pytest.fixture
def small_store(tmp_path, busybox_rootfs):
    """A kiln store on its own 24 MiB tmpfs, holding busybox."""
    with tmpfs_store(tmp_path / "small", "24m", busybox_rootfs) as kiln:
        yield kiln


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _contents(root: Path) -> dict[str, list[str]]:
    """What a failed build must leave as it found: blobs, layers, tags, and an empty tmp/."""
    return {d: sorted(os.listdir(root / d)) for d in ("blobs/sha256", "layers", "tmp")} | {
        "index": [(root / "index.json").read_text()]}


def _assert_clean_failure(p, line: int, *texts: str) -> None:
    assert p.returncode == 125, p.err[-3000:]
    assert "Traceback" not in p.err, p.err[-3000:]
    last = p.err.strip().splitlines()[-1]
    assert last.startswith("kiln: error: ") and f"/Containerfile:{line}: " in last, last
    for text in texts:
        assert text in last, last


def test_disk_full_inside_copy_names_the_step(small_store, tmp_path):
    root = small_store.root
    big = _free(root) + (8 << 20)
    ctx = build_context(tmp_path, "FROM busybox\nENV A=1\nCOPY big /big\n")
    with open(ctx / "big", "wb") as f:
        f.truncate(big)  # sparse here, written out in full by the copy
    before = _contents(root)
    p = small_store("build", "-t", "big:1", str(ctx), check=False)
    _assert_clean_failure(p, 3, "copying big to /big: No space left on device")
    assert _contents(root) == before


def test_disk_full_in_the_layer_commit_names_the_step(small_store, tmp_path):
    # the file fits in the step's upper dir, its compressed layer blob does not fit beside it
    root = small_store.root
    size = int(_free(root) / 1.5)
    ctx = build_context(tmp_path, "FROM busybox\nCOPY noise /noise\nENV AFTER=1\n")
    (ctx / "noise").write_bytes(os.urandom(size))
    before = _contents(root)
    p = small_store("build", "-t", "noise:1", str(ctx), check=False)
    _assert_clean_failure(p, 2, "COPY noise /noise: writing its layer", "No space left on device")
    assert _contents(root) == before
    assert "noise" not in small_store("images").out


@pytest.mark.parametrize("source, where", [("stage", "stage stage"), ("busybox", "image busybox")])
def test_a_missing_path_in_a_stage_or_image_says_where(kb, tmp_path, source, where):
    cf = f"FROM busybox AS stage\nRUN true\nFROM busybox\nCOPY --from={source} /nope /x\n"
    ctx = build_context(tmp_path, cf)
    p = kb("build", str(ctx), check=False)
    _assert_clean_failure(p, 4, f"/nope: no such file or directory in {where}")
    assert "build context" not in p.err
