"""podman loads kiln's docker-archive and oci-archive and runs busybox from them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.interop.conftest import (
    BUSYBOX,
    differences,
    kiln_inspect,
    layer_dirs,
    overlay_of,
    tree_view,
)
from tests.interop.layered import LAYERED, check_merged_view, load_layered

pytestmark = pytest.mark.interop


def podman_image(tools, name: str) -> dict:
    return json.loads(tools.podman("image", "inspect", name).stdout)[0]


def assert_runs_hello(tools, name: str) -> None:
    p = tools.podman("run", "--rm", "--network", "none", name, "/bin/busybox", "echo", "hello")
    assert p.stdout == "hello\n", p.stderr


def load_as(tools, archive, name: str, image_id: str, loaded: str = BUSYBOX) -> None:
    """podman load into a storage without this image, then give it a name of this test's."""
    # podman keys images by config digest: an earlier load of the same image would be
    # reused as it is (another manifest digest and all), hiding what this load does
    tools.podman("rmi", "--force", image_id, check=False)
    out = tools.podman("load", "-i", str(archive)).stdout
    assert f"Loaded image: {loaded}" in out, out
    if name != loaded:
        tools.podman("tag", loaded, name)
        tools.podman("rmi", loaded)


def test_podman_loads_and_runs_kiln_docker_archive(container_tools, saved_docker_archive,
                                                   busybox_info):
    name = "localhost/interop/from-docker-archive:1"
    load_as(container_tools, saved_docker_archive, name, busybox_info["Id"])
    image = podman_image(container_tools, name)
    assert image["Id"] == busybox_info["Id"]
    assert image["RootFS"]["Layers"] == [la["DiffID"] for la in busybox_info["Layers"]]
    assert_runs_hello(container_tools, name)


def test_podman_loads_and_runs_kiln_oci_archive(container_tools, saved_oci_archive,
                                                busybox_info):
    """The oci-archive keeps kiln's zstd layers: podman must decompress them."""
    name = "localhost/interop/from-oci-archive:1"
    load_as(container_tools, saved_oci_archive, name, busybox_info["Id"])
    image = podman_image(container_tools, name)
    assert image["Id"] == busybox_info["Id"]
    assert image["Digest"] == busybox_info["Digest"]
    assert image["RootFS"]["Layers"] == [la["DiffID"] for la in busybox_info["Layers"]]
    assert_runs_hello(container_tools, name)


@pytest.mark.parametrize("fmt", ["oci-archive", "docker-archive"])
def test_podman_applies_kiln_layers_like_kiln(container_tools, kiln, tmp_path, fmt):
    """podman's graph driver shows the same tree kiln's layer dirs give, whiteouts and all."""
    load_layered(kiln, tmp_path)
    archive = tmp_path / "layered.tar"
    kiln("save", "-q", LAYERED, "-o", str(archive), "--format", fmt)
    info = kiln_inspect(kiln, LAYERED)
    load_as(container_tools, archive, LAYERED, info["Id"], loaded=LAYERED)
    image = podman_image(container_tools, LAYERED)
    assert image["RootFS"]["Layers"] == [la["DiffID"] for la in info["Layers"]]
    mounted = Path(container_tools.podman("image", "mount", LAYERED).stdout.strip())
    try:
        check_merged_view(mounted, pre_epoch_mtime=0)
        podman_view = tree_view(mounted)
    finally:
        container_tools.podman("image", "unmount", LAYERED)
    lower, upper = layer_dirs(kiln, LAYERED)
    with overlay_of([upper, lower], tmp_path / "merged") as merged:
        kiln_view = tree_view(merged)
    # containers/storage sets mtimes before 1970 to the epoch (its Chtimes does so on purpose)
    kiln_view["before-1970"] = (*kiln_view["before-1970"][:-1], 0)
    assert differences(podman_view, kiln_view, got_by="podman") == []


def test_podman_save_loads_into_kiln(container_tools, saved_docker_archive, busybox_info,
                                     tmp_path, kiln):
    """The other direction: what podman save writes (both formats) kiln loads unchanged."""
    tools = container_tools
    first, second = "localhost/interop/saved-by-podman:1", "localhost/interop/saved-by-podman:2"
    load_as(tools, saved_docker_archive, first, busybox_info["Id"])
    tools.podman("tag", first, second)
    diff_ids = [la["DiffID"] for la in busybox_info["Layers"]]

    docker_archive = tmp_path / "podman-docker.tar"
    tools.podman("save", "--format", "docker-archive", "-m", "-o", str(docker_archive),
                 first, second)
    out = kiln("load", "-q", "-i", str(docker_archive)).out
    assert f"Loaded image: {first}" in out and f"Loaded image: {second}" in out, out
    for name in (first, second):
        loaded = kiln_inspect(kiln, name)
        assert loaded["Id"] == busybox_info["Id"]
        assert [la["DiffID"] for la in loaded["Layers"]] == diff_ids

    oci_archive = tmp_path / "podman-oci.tar"
    tools.podman("save", "--format", "oci-archive", "-o", str(oci_archive), first)
    kiln("rmi", first)
    kiln("load", "-q", "-i", str(oci_archive))
    loaded = kiln_inspect(kiln, first)
    # podman rewrites the config when it writes OCI (so the ID is podman's, not kiln's)
    podman_config = tools.skopeo("inspect", "--config", "--raw",
                                 f"oci-archive:{oci_archive}").stdout.encode()
    assert loaded["Id"] == hashlib.sha256(podman_config).hexdigest()
    assert [la["DiffID"] for la in loaded["Layers"]] == diff_ids


def _entries(layout: Path) -> set[str]:
    return {str(p.relative_to(layout)) for p in layout.rglob("*")
            if p.parent != layout / "blobs" / "sha256"}


def test_kiln_save_writes_files_like_podman_save(container_tools, busybox_kiln,
                                                 saved_docker_archive, busybox_info, tmp_path):
    """Same permissions (from the umask) and no extra files: a saved image is shareable."""
    tools = container_tools
    name = "localhost/interop/modes:1"
    load_as(tools, saved_docker_archive, name, busybox_info["Id"])
    old_umask = os.umask(0o022)  # the tools inherit it, as from a login shell
    try:
        unlike = []
        for fmt in ("oci-archive", "docker-archive", "oci"):
            ours, theirs = tmp_path / f"kiln-{fmt}", tmp_path / f"podman-{fmt}"
            busybox_kiln("save", "-q", "busybox:latest", "-o", str(ours), "--format", fmt)
            tools.podman("save", "--format", "oci-dir" if fmt == "oci" else fmt,
                         "-o", str(theirs), name)
            if ours.stat().st_mode != theirs.stat().st_mode:
                unlike.append(f"{fmt}: kiln {oct(ours.stat().st_mode)}, "
                              f"podman {oct(theirs.stat().st_mode)}")
        extra = _entries(tmp_path / "kiln-oci") - _entries(tmp_path / "podman-oci")
        if extra:
            unlike.append(f"oci: only kiln's layout has {sorted(extra)}")
        assert not unlike, "kiln save output unlike podman save's:\n" + "\n".join(unlike)
    finally:
        os.umask(old_umask)


def test_podman_loads_every_image_of_a_kiln_docker_archive(container_tools, kiln,
                                                          saved_oci_archive, tmp_path):
    kiln("load", "-q", "-i", str(saved_oci_archive))
    load_layered(kiln, tmp_path)
    archive = tmp_path / "two-images.tar"
    kiln("save", "-q", BUSYBOX, LAYERED, "-o", str(archive), "--format", "docker-archive")
    for name in (BUSYBOX, LAYERED):
        container_tools.podman("rmi", "--force", kiln_inspect(kiln, name)["Id"], check=False)
    out = container_tools.podman("load", "-i", str(archive)).stdout
    for name in (BUSYBOX, LAYERED):
        assert f"Loaded image: {name}" in out, out
        assert podman_image(container_tools, name)["Id"] == kiln_inspect(kiln, name)["Id"]


def test_save_to_stdout_and_load_from_stdin_through_podman(container_tools, kiln, tmp_path,
                                                           busybox_rootfs):
    """kiln save | podman load and podman save | kiln load, both through pipes, of a
    signed image: its archive holds the image alone, which podman takes."""
    import subprocess

    kiln("import", str(busybox_rootfs), "localhost/interop/piped:1")
    kiln("key", "generate", "-o", str(tmp_path / "k"), env={"KILN_PASSWORD": "pw"})
    kiln("sign", "localhost/interop/piped:1", "--key", str(tmp_path / "k.key"),
         env={"KILN_PASSWORD": "pw"})
    info = kiln_inspect(kiln, "localhost/interop/piped:1")
    container_tools.podman("rmi", "--force", info["Id"], check=False)
    for fmt in ("oci-archive", "docker-archive"):
        save = subprocess.Popen(kiln.argv("save", "--format", fmt, "localhost/interop/piped:1"),
                                stdout=subprocess.PIPE, env=kiln.environ())
        load = subprocess.run(container_tools.podman_argv("load"), stdin=save.stdout,
                              capture_output=True, text=True, env=container_tools.environ())
        save.stdout.close()
        assert save.wait() == 0 and load.returncode == 0, load.stderr
        assert "Loaded image: localhost/interop/piped:1" in load.stdout, (fmt, load.stdout)
        assert_runs_hello(container_tools, "localhost/interop/piped:1")
        container_tools.podman("rmi", "--force", info["Id"])
    # podman save | kiln load, into another store
    container_tools.podman("pull", "-q", f"oci-archive:{_saved(kiln, tmp_path)}")
    other = type(kiln)(tmp_path / "other")
    save = subprocess.Popen(container_tools.podman_argv("save", "--format", "oci-archive",
                                                        "localhost/interop/piped:1"),
                            stdout=subprocess.PIPE, env=container_tools.environ())
    load = subprocess.run(other.argv("load"), stdin=save.stdout, capture_output=True,
                          text=True, env=other.environ())
    save.stdout.close()
    assert save.wait() == 0 and load.returncode == 0, load.stderr
    assert "Loaded image: localhost/interop/piped:1" in load.stdout
    assert other("run", "--rm", "--network", "none", "localhost/interop/piped:1", "echo",
                 "piped").out == "piped\n"
    # a terminal is refused, as docker save refuses
    p = subprocess.run(["script", "-qec", " ".join(kiln.argv("save", "busybox")), "/dev/null"],
                       capture_output=True, text=True, env=kiln.environ())
    assert p.returncode == 125 and "refusing to write" in p.stdout


def _saved(kiln, tmp_path) -> Path:
    out = tmp_path / "piped.tar"
    kiln("save", "-q", "localhost/interop/piped:1", "-o", str(out))
    return out

