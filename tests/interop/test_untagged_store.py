"""A store that keeps images built without -t (index.json entries without a ref name, as
the OCI image layout allows) is still an OCI layout skopeo and umoci read by name."""

from __future__ import annotations

import json

import pytest

from tests.builder.conftest import build_context
from tests.conftest import KilnCLI
from tests.interop.conftest import BUSYBOX, require_tool, run_tool, umoci_unpack

pytestmark = pytest.mark.interop

REF_NAME = "org.opencontainers.image.ref.name"


@pytest.fixture
def store_with_untagged(tmp_path, busybox_rootfs) -> tuple[KilnCLI, str]:
    kiln = KilnCLI(tmp_path / "root")
    # gzip: umoci 0.4 cannot read zstd layers
    kiln("import", "--compression-format", "gzip", str(busybox_rootfs), "busybox")
    ctx = build_context(tmp_path, "FROM busybox\nRUN echo untagged > /made\n")
    image_id = kiln("build", "-q", str(ctx)).out.strip().removeprefix("sha256:")
    kiln("build", "-q", "--compression-format", "gzip", "-t", "tagged:1", str(build_context(
        tmp_path, "FROM busybox\nRUN echo tagged > /made\n", name="tagged")))
    entries = json.loads((kiln.root / "index.json").read_text())["manifests"]
    assert sum(1 for e in entries if REF_NAME not in e.get("annotations", {})) == 1
    return kiln, image_id


def test_skopeo_reads_tagged_images_beside_untagged_ones(store_with_untagged):
    kiln, _ = store_with_untagged
    for name in (BUSYBOX, "docker.io/library/tagged:1"):
        shown = json.loads(run_tool([require_tool("skopeo"), "inspect",
                                     f"oci:{kiln.root}:{name}"]).stdout)
        assert shown["Digest"] == json.loads(kiln("inspect", name).out)[0]["Digest"]


def test_umoci_lists_the_names_and_unpacks_beside_untagged_ones(store_with_untagged, tmp_path):
    kiln, _ = store_with_untagged
    names = run_tool([require_tool("umoci"), "ls", "--layout", str(kiln.root)]).stdout.split()
    assert sorted(names) == [BUSYBOX, "docker.io/library/tagged:1"]
    rootfs = umoci_unpack(kiln.root, "docker.io/library/tagged:1", tmp_path / "bundle")
    assert (rootfs / "made").read_text() == "tagged\n"
