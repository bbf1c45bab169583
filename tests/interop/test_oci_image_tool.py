"""oci-image-tool validate accepts what kiln writes (gzip layers: Debian's build has no zstd)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.interop.conftest import BUSYBOX, layout_blob, require_tool, run_tool

pytestmark = pytest.mark.interop


def validate(layout, *ref: str, check: bool = True):
    args = [require_tool("oci-image-tool"), "validate", "--type", "image"]
    for r in ref:
        args += ["--ref", r]
    return run_tool([*args, str(layout)], check=check)


def test_validates_kiln_save_oci_gzip(saved_oci_gzip):
    p = validate(saved_oci_gzip)
    assert "Validation succeeded" in p.stdout + p.stderr
    p = validate(saved_oci_gzip, f"name={BUSYBOX}")
    assert f"reference [name={BUSYBOX}]: OK" in p.stdout + p.stderr


def test_validates_the_store_root_when_its_layers_are_gzip(kiln, busybox_rootfs):
    kiln("import", "--compression-format", "gzip", str(busybox_rootfs), "busybox:gzip")
    p = validate(kiln.root, "name=docker.io/library/busybox:gzip")
    assert "Validation succeeded" in p.stdout + p.stderr


def test_validation_fails_on_a_broken_copy(saved_oci_gzip, tmp_path):
    """Control: the tool really checks blobs, so the passes above mean something."""
    broken = tmp_path / "broken"
    shutil.copytree(saved_oci_gzip, broken)
    index = json.loads((broken / "index.json").read_text())
    manifest = json.loads(layout_blob(broken, index["manifests"][0]["digest"]))
    layer = manifest["layers"][0]["digest"]
    blob = broken / "blobs" / "sha256" / layer.split(":")[1]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    p = validate(broken, check=False)
    assert p.returncode != 0, p.stdout + p.stderr
    assert "digest mismatch" in p.stderr
