import json
import os
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import PROJECT


def test_version_and_help(kiln):
    assert kiln("--version").out == "kiln 0.1.0\n"
    assert kiln("--root", str(kiln.root), "--version").out == "kiln 0.1.0\n"  # by click
    out = kiln("--help").out
    for cmd in ("import", "images", "tag", "rmi", "inspect", "history", "save", "load", "prune"):
        assert cmd in out


def test_default_root_as_root_and_as_user(tmp_path):
    code = ("import os, store.store as s; print(s.default_root())")
    env = {k: v for k, v in os.environ.items() if k != "KILN_ROOT"}
    as_root = subprocess.run([sys.executable, "-c", code], env=env, cwd=PROJECT,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert as_root == ("/var/lib/kiln" if os.geteuid() == 0 else as_root)
    code_user = ("import os; os.geteuid = lambda: 1000; import store.store as s; "
                 "print(s.default_root())")
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    as_user = subprocess.run([sys.executable, "-c", code_user], env=env, cwd=PROJECT,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert as_user == str(tmp_path / "xdg" / "kiln")


def test_root_flag_and_env(kiln, tmp_path, busybox_rootfs):
    other = tmp_path / "other-root"
    kiln("--root", str(other), "import", str(busybox_rootfs), "viaflag")
    assert (other / "oci-layout").is_file()
    assert "viaflag" in kiln("--root", str(other), "images").out
    assert "viaflag" not in kiln("images").out  # KILN_ROOT (the fixture's root) is another store


@pytest.mark.parametrize("args, message", [
    (["inspect", "nosuch"], "image docker.io/library/nosuch:latest is not in the store"),
    (["tag", "nosuch", "x"], "is not in the store"),
    (["inspect", "Bad_Name"], "invalid image reference"),
    (["import", "/nonexistent/dir", "x"], "no such file or directory"),
    (["images", "--bogus"], "No such option"),
    (["load", "-i", "/nonexistent.tar"], "no such file or directory"),
    (["frobnicate"], "No such command"),
])
def test_errors_are_one_line_and_exit_125(kiln, args, message):
    p = kiln(*args, check=False)
    assert p.returncode == 125
    assert p.err.startswith("kiln: error: ")
    assert message in p.err
    assert "Traceback" not in p.err


def test_import_images_inspect_history(kiln, busybox_rootfs, tmp_path):
    digest = kiln("import", str(busybox_rootfs), "busybox:1").out.strip()
    assert digest.startswith("sha256:")
    table = kiln("images").out.splitlines()
    assert table[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert table[1].split()[:2] == ["docker.io/library/busybox", "1"]
    assert digest in kiln("images", "--digests").out
    rows = json.loads(kiln("images", "--format", "json").out)
    assert rows[0]["Names"] == ["docker.io/library/busybox:1"] and rows[0]["Digest"] == digest
    assert kiln("images", "-q").out.split() == [rows[0]["Id"][:12]]

    info = json.loads(kiln("inspect", "busybox:1").out)[0]
    assert info["Digest"] == digest and info["Id"] == rows[0]["Id"]
    assert info["RepoTags"] == ["docker.io/library/busybox:1"]
    assert info["Os"] == "linux" and info["Architecture"] in ("amd64", "arm64")
    assert any(e.startswith("PATH=") for e in info["Config"]["Env"])
    assert info["RootFS"]["type"] == "layers" and len(info["Layers"]) == 1
    assert info["Layers"][0]["MediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert info["Created"].endswith("Z")
    # by ID prefix and by digest too
    assert json.loads(kiln("inspect", rows[0]["Id"][:12]).out)[0]["Digest"] == digest
    assert json.loads(kiln("inspect", "busybox@" + digest).out)[0]["Digest"] == digest
    assert "kiln import" in kiln("history", "busybox:1").out


def test_import_tarball(kiln, busybox_rootfs, tmp_path):
    tarball = tmp_path / "rootfs.tar.gz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(busybox_rootfs), "."], check=True)
    kiln("import", str(tarball), "fromtar")
    info = json.loads(kiln("inspect", "fromtar").out)[0]
    assert len(info["Layers"]) == 1
    # same files as the directory import
    kiln("import", str(busybox_rootfs), "fromdir")
    root = kiln.root
    a = root / "layers" / info["Layers"][0]["DiffID"][7:] / "diff"
    assert os.path.islink(a / "bin" / "sh") and (a / "bin" / "busybox").is_file()


def test_tag_and_rmi(kiln, busybox_rootfs):
    kiln("import", str(busybox_rootfs), "busybox")
    kiln("tag", "busybox", "localhost:5000/bb:2", "other")
    names = json.loads(kiln("images", "--format", "json").out)[0]["Names"]
    assert set(names) == {"docker.io/library/busybox:latest", "localhost:5000/bb:2",
                          "docker.io/library/other:latest"}
    assert kiln("rmi", "other").out.strip() == "Untagged: docker.io/library/other:latest"
    kiln("rmi", "localhost:5000/bb:2")
    out = kiln("rmi", "busybox").out
    assert "Deleted" in out
    assert json.loads(kiln("images", "--format", "json").out) == []
    assert os.listdir(kiln.root / "blobs" / "sha256") == []
    assert os.listdir(kiln.root / "layers") == []


def test_rmi_refuses_an_image_a_container_uses(kiln, busybox_rootfs):
    digest = kiln("import", str(busybox_rootfs), "busybox").out.strip()
    ctr = kiln.root / "containers" / "c0ffee"
    ctr.mkdir(parents=True)
    (ctr / "state.json").write_text(json.dumps({"image": digest}))
    p = kiln("rmi", "busybox", check=False)
    assert p.returncode == 125 and "in use by container(s) c0ffee" in p.err
    assert "busybox" in kiln("images").out
    kiln("rmi", "-f", "busybox")
    assert "busybox" not in kiln("images").out


def test_save_load_all_formats(kiln, busybox_rootfs, tmp_path):
    kiln("import", str(busybox_rootfs), "busybox")
    want = json.loads(kiln("inspect", "busybox").out)[0]
    for fmt, path in [("oci", tmp_path / "dir"), ("oci-archive", tmp_path / "a.tar"),
                      ("docker-archive", tmp_path / "d.tar")]:
        kiln("save", "busybox", "-o", str(path), "--format", fmt)
        fresh = tmp_path / f"root-{fmt}"
        out = kiln("--root", str(fresh), "load", "-i", str(path)).out
        assert "Loaded image: docker.io/library/busybox:latest" in out
        got = json.loads(kiln("--root", str(fresh), "inspect", "busybox").out)[0]
        assert got["Id"] == want["Id"], fmt  # same config, so same image ID
        assert [la["DiffID"] for la in got["Layers"]] == [la["DiffID"] for la in want["Layers"]]
        if fmt != "docker-archive":
            assert got["Digest"] == want["Digest"], fmt  # manifest kept byte for byte


def test_save_gzip_recompresses_and_docker_archive_is_uncompressed(kiln, busybox_rootfs,
                                                                     tmp_path):
    kiln("import", str(busybox_rootfs), "busybox")
    kiln("save", "busybox", "-o", str(tmp_path / "gz"), "--format", "oci",
         "--compression-format", "gzip")
    index = json.loads((tmp_path / "gz" / "index.json").read_text())
    manifest = json.loads((tmp_path / "gz/blobs/sha256" / index["manifests"][0]["digest"][7:])
                          .read_text())
    assert manifest["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    kiln("save", "busybox", "-o", str(tmp_path / "d.tar"), "--format", "docker-archive")
    with tarfile.open(tmp_path / "d.tar") as t:
        entries = json.load(t.extractfile("manifest.json"))
        layer = t.extractfile(entries[0]["Layers"][0]).read(512)
    assert layer[257:262] == b"ustar"  # a plain tar, as docker save writes
    p = kiln("save", "busybox", "-o", str(tmp_path / "z.tar"), "--format", "docker-archive",
             "--compression-format", "zstd", check=False)
    assert p.returncode == 125 and "always uncompressed" in p.err
    assert not (tmp_path / "z.tar").exists()


def test_save_of_missing_image_leaves_no_output(kiln, busybox_rootfs, tmp_path):
    kiln("import", str(busybox_rootfs), "busybox")
    for fmt in ("oci", "oci-archive", "docker-archive"):
        out = tmp_path / f"out-{fmt}"
        p = kiln("save", "busybox", "nosuch", "-o", str(out), "--format", fmt, check=False)
        assert p.returncode == 125
        assert sorted(os.listdir(tmp_path)) == sorted(n for n in os.listdir(tmp_path)
                                                      if not n.startswith("out-"))
        assert not out.exists()


def test_docker_archive_lists_an_image_once_with_all_its_names(kiln, busybox_rootfs, tmp_path):
    kiln("import", str(busybox_rootfs), "busybox")
    kiln("tag", "busybox", "other:2")
    kiln("save", "busybox", "other:2", "-o", str(tmp_path / "d.tar"), "--format",
         "docker-archive")
    with tarfile.open(tmp_path / "d.tar") as t:
        entries = json.load(t.extractfile("manifest.json"))
    assert len(entries) == 1
    assert entries[0]["RepoTags"] == ["docker.io/library/busybox:latest",
                                      "docker.io/library/other:2"]
    out = kiln("--root", str(tmp_path / "fresh"), "load", "-i", str(tmp_path / "d.tar")).out
    assert "docker.io/library/other:2" in out and "docker.io/library/busybox:latest" in out
