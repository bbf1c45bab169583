"""Images buildah makes, exported by skopeo as OCI layouts, load into kiln unchanged."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.interop.conftest import (
    differences,
    kiln_inspect,
    layer_dirs,
    overlay_of,
    tree_view,
    umoci_unpack,
)

pytestmark = pytest.mark.interop

BASE = "localhost/interop/bb-buildah:1"
LAYERED = "localhost/interop/bb-layered:1"

CONTAINERFILE = f"""\
FROM {BASE}
RUN mkdir -p /data/sub && echo a > /data/a && echo b > /data/sub/b && echo doomed > /doomed
RUN rm /doomed /bin/vi && rm -rf /data && mkdir /data && echo c > /data/c
"""


@dataclass
class BuildahImage:
    name: str
    image_id: str  # buildah's image ID: the config digest hex
    diff_ids: list[str]
    layout: Path  # `skopeo copy containers-storage:... oci:` of it


def _export(tools, name: str, dest: Path) -> BuildahImage:
    info = json.loads(tools.buildah("inspect", "--type", "image", name).stdout)
    tools.skopeo("--insecure-policy", "copy", tools.storage_ref(name), f"oci:{dest}:{name}")
    return BuildahImage(name, info["FromImageID"], info["OCIv1"]["rootfs"]["diff_ids"], dest)


@pytest.fixture(scope="module")
def buildah_images(container_tools, busybox_rootfs, tmp_path_factory) -> dict[str, BuildahImage]:
    """BASE: from scratch + copy + config + commit; LAYERED: bud with two RUN steps."""
    tools = container_tools
    work = tmp_path_factory.mktemp("buildah")
    ctr = tools.buildah("from", "scratch").stdout.strip()
    try:
        tools.buildah("copy", ctr, str(busybox_rootfs), "/")
        tools.buildah("config", "--env", "GREETING=hello from buildah", "--cmd", "/bin/sh",
                      "--label", "made-by=buildah", ctr)
        tools.buildah("commit", ctr, BASE)
    finally:
        tools.buildah("rm", ctr)
    (work / "ctx").mkdir()
    (work / "ctx" / "Containerfile").write_text(CONTAINERFILE)
    tools.buildah("bud", "--runtime", "/usr/sbin/runc", "--layers", "--pull=never",
                  "--network", "none", "-t", LAYERED, str(work / "ctx"))
    return {name: _export(tools, name, work / name.split("/")[-1].replace(":", "-"))
            for name in (BASE, LAYERED)}


def test_buildah_commit_loads_into_kiln_unchanged(buildah_images, kiln, busybox_rootfs):
    built = buildah_images[BASE]
    out = kiln("load", "-q", "-i", str(built.layout)).out
    assert BASE in out
    info = kiln_inspect(kiln, BASE)
    assert [la["DiffID"] for la in info["Layers"]] == built.diff_ids
    assert info["Id"] == built.image_id
    assert "GREETING=hello from buildah" in info["Config"]["Env"]
    assert info["Config"]["Labels"]["made-by"] == "buildah"
    (layer,) = layer_dirs(kiln, BASE)
    assert (layer / "bin" / "busybox").read_bytes() == (
        busybox_rootfs / "bin" / "busybox").read_bytes()
    assert os.readlink(layer / "bin" / "sh") == "busybox"


def test_buildah_layers_and_whiteouts_load_into_kiln(buildah_images, kiln, tmp_path):
    built = buildah_images[LAYERED]
    kiln("load", "-q", "-i", str(built.layout))
    info = kiln_inspect(kiln, LAYERED)
    assert [la["DiffID"] for la in info["Layers"]] == built.diff_ids
    assert len(built.diff_ids) == 3
    assert info["Id"] == built.image_id

    base, adds, deletes = layer_dirs(kiln, LAYERED)
    # buildah's OCI whiteouts became overlay ones in kiln's layer dir
    for gone in ("doomed", "bin/vi"):
        st = os.lstat(deletes / gone)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, gone
    assert os.getxattr(deletes / "data", "trusted.overlay.opaque") == b"y"
    assert not [p for p in deletes.rglob(".wh.*")]

    # and what kiln would run over equals what umoci unpacks from buildah's own layers
    with overlay_of([deletes, adds, base], tmp_path / "merged") as merged:
        kiln_view = tree_view(merged)
    assert sorted(os.listdir(tmp_path / "merged")) == []  # unmounted again
    assert "doomed" not in kiln_view and "bin/vi" not in kiln_view
    assert sorted(k for k in kiln_view if k.startswith("data/")) == ["data/c"]
    rootfs = umoci_unpack(built.layout, LAYERED, tmp_path / "bundle")
    assert differences(tree_view(rootfs), kiln_view, want_by="kiln's layer dirs") == []
