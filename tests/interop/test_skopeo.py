"""skopeo reads kiln's store, its saved layouts and archives, and writes what kiln loads."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.interop.conftest import BUSYBOX, kiln_inspect, layout_blob, require_tool, run_tool
from tests.interop.layered import LAYERED, load_layered

pytestmark = pytest.mark.interop


def skopeo(*args: str) -> str:
    return run_tool([require_tool("skopeo"), *args]).stdout


def test_skopeo_inspects_the_store_root_as_an_oci_layout(busybox_kiln, busybox_info):
    ref = f"oci:{busybox_kiln.root}:{BUSYBOX}"
    shown = json.loads(skopeo("inspect", ref))
    assert shown["Digest"] == busybox_info["Digest"]
    assert shown["Layers"] == [la["Digest"] for la in busybox_info["Layers"]]
    assert shown["Env"] == busybox_info["Config"]["Env"]
    assert (shown["Os"], shown["Architecture"]) == (busybox_info["Os"],
                                                    busybox_info["Architecture"])

    raw_manifest = skopeo("inspect", "--raw", ref).encode()
    assert "sha256:" + hashlib.sha256(raw_manifest).hexdigest() == busybox_info["Digest"]
    manifest = json.loads(raw_manifest)
    assert [la["mediaType"] for la in manifest["layers"]] == [
        la["MediaType"] for la in busybox_info["Layers"]]


def test_skopeo_config_is_the_config_kiln_wrote(busybox_kiln, busybox_info):
    ref = f"oci:{busybox_kiln.root}:{BUSYBOX}"
    raw_config = skopeo("inspect", "--config", "--raw", ref).encode()
    assert hashlib.sha256(raw_config).hexdigest() == busybox_info["Id"]
    assert raw_config == layout_blob(busybox_kiln.root, "sha256:" + busybox_info["Id"])
    config = json.loads(skopeo("inspect", "--config", ref))
    assert config["rootfs"]["diff_ids"] == [la["DiffID"] for la in busybox_info["Layers"]]
    assert config["rootfs"] == busybox_info["RootFS"]
    assert config["history"] == busybox_info["History"]


def test_skopeo_reads_every_saved_form(saved_oci_zstd, saved_oci_gzip, saved_oci_archive,
                                       busybox_info):
    diff_ids = [la["DiffID"] for la in busybox_info["Layers"]]
    for ref in (f"oci:{saved_oci_zstd}:{BUSYBOX}", f"oci:{saved_oci_gzip}:{BUSYBOX}",
                f"oci-archive:{saved_oci_archive}:{BUSYBOX}"):
        config = json.loads(skopeo("inspect", "--config", "--raw", ref))
        assert config["rootfs"]["diff_ids"] == diff_ids, ref
        manifest = json.loads(skopeo("inspect", "--raw", ref))
        assert manifest["config"]["digest"] == "sha256:" + busybox_info["Id"], ref
    gzip_manifest = json.loads(skopeo("inspect", "--raw", f"oci:{saved_oci_gzip}:{BUSYBOX}"))
    assert [la["mediaType"] for la in gzip_manifest["layers"]] == [
        "application/vnd.oci.image.layer.v1.tar+gzip"]


def test_skopeo_accepts_kiln_docker_archive(saved_docker_archive, busybox_info):
    ref = f"docker-archive:{saved_docker_archive}"
    shown = json.loads(skopeo("inspect", ref))
    diff_ids = [la["DiffID"] for la in busybox_info["Layers"]]
    # docker-archive layers are uncompressed: their digests are the diff_ids
    assert shown["Layers"] == diff_ids
    raw_config = skopeo("inspect", "--config", "--raw", ref).encode()
    assert hashlib.sha256(raw_config).hexdigest() == busybox_info["Id"]
    named = json.loads(skopeo("inspect", f"{ref}:{BUSYBOX}"))
    assert named["Layers"] == diff_ids


def test_skopeo_copies_the_store_image_with_verified_digests(busybox_kiln, busybox_info,
                                                            tmp_path):
    """skopeo verifies every blob it copies: the zstd layers in the store must check out."""
    dest = tmp_path / "copied"
    run_tool([require_tool("skopeo"), "--insecure-policy", "copy", "--preserve-digests",
              f"oci:{busybox_kiln.root}:{BUSYBOX}", f"oci:{dest}:copied"])
    manifest = json.loads(skopeo("inspect", "--raw", f"oci:{dest}:copied"))
    assert [la["digest"] for la in manifest["layers"]] == [
        la["Digest"] for la in busybox_info["Layers"]]


def test_skopeo_docker_archive_loads_into_kiln_as_the_same_image(saved_oci_gzip, busybox_info,
                                                                kiln, tmp_path):
    archive = tmp_path / "x.tar"
    run_tool([require_tool("skopeo"), "--insecure-policy", "copy",
              f"oci:{saved_oci_gzip}:{BUSYBOX}",
              f"docker-archive:{archive}:example.com/interop/busybox:copied"])
    out = kiln("load", "-q", "-i", str(archive)).out
    assert "example.com/interop/busybox:copied" in out
    loaded = kiln_inspect(kiln, "example.com/interop/busybox:copied")
    assert loaded["Id"] == busybox_info["Id"]
    assert [la["DiffID"] for la in loaded["Layers"]] == [
        la["DiffID"] for la in busybox_info["Layers"]]
    assert loaded["RootFS"] == busybox_info["RootFS"]
    # and the image kiln now holds is readable by skopeo again, straight from the store
    again = json.loads(skopeo("inspect", "--config", "--raw",
                              f"oci:{kiln.root}:example.com/interop/busybox:copied"))
    assert again["rootfs"] == busybox_info["RootFS"]


def test_skopeo_docker_archive_of_layered_image_round_trips(kiln, tmp_path):
    """Two layers with whiteouts survive kiln -> gzip OCI -> skopeo docker-archive -> kiln."""
    load_layered(kiln, tmp_path)
    before = kiln_inspect(kiln, LAYERED)
    saved = tmp_path / "saved-gzip"
    kiln("save", "-q", LAYERED, "-o", str(saved), "--format", "oci",
         "--compression-format", "gzip")
    archive = tmp_path / "layered-docker.tar"
    run_tool([require_tool("skopeo"), "--insecure-policy", "copy", f"oci:{saved}:{LAYERED}",
              f"docker-archive:{archive}:example.com/interop/layered:via-skopeo"])
    kiln("load", "-q", "-i", str(archive))
    after = kiln_inspect(kiln, "example.com/interop/layered:via-skopeo")
    assert after["Id"] == before["Id"]
    assert [la["DiffID"] for la in after["Layers"]] == [
        la["DiffID"] for la in before["Layers"]]
