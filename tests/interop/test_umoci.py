"""umoci unpacks kiln's gzip saves to the same tree kiln's own layer dirs give."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.interop.conftest import (
    BUSYBOX,
    differences,
    layer_dirs,
    overlay_of,
    tree_view,
    umoci_unpack,
)
from tests.interop.layered import LAYERED, check_merged_view, load_layered

pytestmark = pytest.mark.interop


def test_umoci_unpacks_busybox_like_kiln(saved_oci_gzip, busybox_kiln, busybox_info,
                                         tmp_path):
    rootfs = umoci_unpack(saved_oci_gzip, BUSYBOX, tmp_path / "bundle")
    (kiln_dir,) = layer_dirs(busybox_kiln, "busybox:latest")
    assert differences(tree_view(rootfs), tree_view(kiln_dir)) == []
    assert os.readlink(rootfs / "bin" / "sh") == "busybox"
    # umoci's runtime config carries the image config kiln wrote
    runtime = json.loads((tmp_path / "bundle" / "config.json").read_text())
    for env in busybox_info["Config"]["Env"]:
        assert env in runtime["process"]["env"]


@pytest.fixture
def layered_save(kiln, tmp_path) -> Path:
    """The two-layer image of layered.py, ``kiln load``-ed, then saved with gzip."""
    load_layered(kiln, tmp_path)
    saved = tmp_path / "saved-gzip"
    kiln("save", "-q", LAYERED, "-o", str(saved), "--format", "oci",
         "--compression-format", "gzip")
    return saved


def test_umoci_applies_kiln_whiteouts_and_opaque_dirs(layered_save, tmp_path):
    check_merged_view(umoci_unpack(layered_save, LAYERED, tmp_path / "bundle"))


def test_umoci_tree_equals_overlay_of_kiln_layer_dirs(layered_save, kiln, tmp_path):
    rootfs = umoci_unpack(layered_save, LAYERED, tmp_path / "bundle")
    lower, upper = layer_dirs(kiln, LAYERED)
    with overlay_of([upper, lower], tmp_path / "merged") as merged:
        check_merged_view(merged)
        want = tree_view(merged)
    assert differences(tree_view(rootfs), want) == []
