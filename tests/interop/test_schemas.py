"""Every index, manifest and config kiln writes validates against the OCI JSON schemas."""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.schema_check import validate_with_schema

pytestmark = pytest.mark.interop

LAYOUT_HEADER = "application/vnd.oci.layout.header.v1+json"
DESCRIPTOR = "application/vnd.oci.descriptor.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"


def validate_layout(read: Callable[[str], bytes]) -> list[str]:
    """Validate oci-layout, index.json and every document reachable from it.

    ``read`` maps a layout-relative path to its bytes. Returns what was validated, as
    "media type digest" lines, so a test can see nothing was skipped.
    """
    validate_with_schema(read("oci-layout"), LAYOUT_HEADER)
    raw_index = read("index.json")
    validate_with_schema(raw_index, INDEX)
    seen = ["index.json"]

    def blob(desc: dict) -> bytes:
        data = read("blobs/sha256/" + desc["digest"].removeprefix("sha256:"))
        assert "sha256:" + hashlib.sha256(data).hexdigest() == desc["digest"]
        assert len(data) == desc["size"], desc
        return data

    def walk_index(doc: dict) -> None:
        for desc in doc["manifests"]:
            validate_with_schema(desc, DESCRIPTOR)
            raw = blob(desc)
            assert desc["mediaType"] in (MANIFEST, INDEX), desc
            validate_with_schema(raw, desc["mediaType"])
            seen.append(f"{desc['mediaType']} {desc['digest']}")
            if desc["mediaType"] == INDEX:
                walk_index(json.loads(raw))
                continue
            manifest = json.loads(raw)
            assert manifest["config"]["mediaType"] == CONFIG, manifest["config"]
            validate_with_schema(blob(manifest["config"]), CONFIG)
            seen.append(f"{CONFIG} {manifest['config']['digest']}")

    walk_index(json.loads(raw_index))
    return seen


def validate_dir(layout: Path) -> list[str]:
    return validate_layout(lambda name: (layout / name).read_bytes())


def validate_archive(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        files = {m.name.removeprefix("./"): tar.extractfile(m).read()
                 for m in tar.getmembers() if m.isfile()}
    return validate_layout(lambda name: files[name])


def test_store_root_documents_validate(busybox_kiln):
    seen = validate_dir(busybox_kiln.root)
    assert len(seen) == 3  # index.json, busybox's manifest and config


def test_gzip_import_and_loaded_images_validate(kiln, busybox_rootfs, saved_docker_archive,
                                                 saved_oci_archive):
    kiln("import", "--compression-format", "gzip", str(busybox_rootfs), "imported:gzip")
    kiln("load", "-q", "-i", str(saved_docker_archive))  # manifest rewritten for zstd
    kiln("tag", "busybox:latest", "busybox:second-name")
    kiln("load", "-q", "-i", str(saved_oci_archive))
    seen = validate_dir(kiln.root)
    names = json.loads((kiln.root / "index.json").read_text())["manifests"]
    assert len(names) == 3
    assert len(seen) == 1 + 2 * len(names)


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_saved_oci_dir_validates(kiln, saved_oci_archive, tmp_path, compression):
    kiln("load", "-q", "-i", str(saved_oci_archive))
    kiln("tag", "busybox:latest", "example.com/interop/other:2")
    out = tmp_path / "saved"
    kiln("save", "-q", "busybox:latest", "example.com/interop/other:2", "-o", str(out),
                 "--format", "oci", "--compression-format", compression)
    seen = validate_dir(out)
    assert len(seen) == 5  # two names in index.json, each with a manifest and config


def test_saved_oci_archive_validates(saved_oci_archive):
    assert len(validate_archive(saved_oci_archive)) == 3


def test_the_check_can_fail(busybox_kiln):
    """Control: a document kiln would never write is rejected."""
    index = json.loads((busybox_kiln.root / "index.json").read_text())
    del index["schemaVersion"]
    with pytest.raises(AssertionError, match="schemaVersion"):
        validate_with_schema(index, INDEX)
