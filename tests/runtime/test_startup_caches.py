"""What `kiln run` keeps between runs to start quickly (the seccomp program, image lookups),
and the cgroup warm-up: each must give exactly what the slow way gives, and never a stale
or damaged answer."""

from __future__ import annotations

import json
import marshal
import os
import shutil
import subprocess
import sys
import time

import pytest

from runtime.seccomp import compile_profile, default_profile
from runtime.seccomp_cache import default_filter
from tests.conftest import PROJECT

DOCKER_CAPS = frozenset({
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
})


def _compiled(caps) -> bytes:
    return compile_profile(default_profile(), capabilities=caps)


def test_cached_filter_is_the_compiled_one(tmp_path):
    first = default_filter(DOCKER_CAPS, str(tmp_path))
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".bpf")
    assert default_filter(DOCKER_CAPS, str(tmp_path)) == first == _compiled(DOCKER_CAPS)


def test_other_capabilities_get_their_own_program(tmp_path):
    admin = DOCKER_CAPS | {"CAP_SYS_ADMIN"}
    plain = default_filter(DOCKER_CAPS, str(tmp_path))
    with_admin = default_filter(admin, str(tmp_path))
    assert len(os.listdir(tmp_path)) == 2
    assert with_admin != plain  # mount, unshare ... are allowed with CAP_SYS_ADMIN
    assert default_filter(admin, str(tmp_path)) == _compiled(admin)
    assert default_filter(DOCKER_CAPS, str(tmp_path)) == _compiled(DOCKER_CAPS)


@pytest.mark.parametrize("damage", ["flip a byte of the program", "truncate", "other kernel",
                                    "other code", "empty"])
def test_a_damaged_or_foreign_cache_file_is_never_loaded(tmp_path, damage):
    default_filter(DOCKER_CAPS, str(tmp_path))
    path = tmp_path / os.listdir(tmp_path)[0]
    data = path.read_bytes()
    if damage == "flip a byte of the program":
        data = data[:-5] + bytes([data[-5] ^ 0x01]) + data[-4:]
    elif damage == "truncate":
        data = data[:-8]
    elif damage == "other kernel":
        data = data.replace(b"\nkernel ", b"\nkernel 1.0-", 1)
    elif damage == "other code":
        data = data.replace(b"code ", b"code 0", 1)
    else:
        data = b""
    path.write_bytes(data)
    assert default_filter(DOCKER_CAPS, str(tmp_path)) == _compiled(DOCKER_CAPS)
    assert path.read_bytes() != data  # rewritten
    assert default_filter(DOCKER_CAPS, str(tmp_path)) == _compiled(DOCKER_CAPS)


def test_old_programs_do_not_pile_up(tmp_path):
    from runtime.seccomp_cache import MAX_FILES

    for i in range(MAX_FILES + 3):  # as many kernels or kiln versions
        (tmp_path / f"seccomp-old{i}.bpf").write_bytes(b"x")
    default_filter(DOCKER_CAPS, str(tmp_path))
    assert len(os.listdir(tmp_path)) == 1
    assert default_filter(DOCKER_CAPS, str(tmp_path)) == _compiled(DOCKER_CAPS)


def test_without_a_cache_dir_it_compiles(tmp_path):
    assert default_filter(DOCKER_CAPS, None) == _compiled(DOCKER_CAPS)


def test_an_unwritable_cache_dir_still_gives_the_filter(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a dir")
    assert default_filter(DOCKER_CAPS, str(blocked / "cache")) == _compiled(DOCKER_CAPS)


def test_the_cached_filter_spares_the_compiler(tmp_path):
    code = ("import sys; from runtime.seccomp_cache import default_filter; "
            f"default_filter({sorted(DOCKER_CAPS)!r}, {str(tmp_path)!r}); "
            "print('runtime.seccomp' in sys.modules)")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=PROJECT, check=True).stdout.strip() for _ in range(2)]
    assert runs == ["True", "False"]


# -- image lookups -------------------------------------------------------------------------
def _rootfs_with(base, tmp_path, name: str, text: str):
    root = tmp_path / name
    shutil.copytree(base, root, symlinks=True)
    (root / "which").write_text(text)
    return root


def _lookup_path(root):
    return root / "containers" / ".cache" / "images.marshal"


def _lookup_file(root) -> dict:
    from runtime.image_lookup import MAGIC

    data = _lookup_path(root).read_bytes()
    assert data.startswith(MAGIC)
    return marshal.loads(data[len(MAGIC):])


def test_a_retagged_name_runs_the_new_image(kiln, busybox_rootfs, tmp_path):
    kiln("import", str(_rootfs_with(busybox_rootfs, tmp_path, "a", "A")), "app")
    assert kiln("run", "--rm", "app", "cat", "/which").out == "A"
    assert list(_lookup_file(kiln.root)["images"]) == ["app"]
    assert kiln("run", "--rm", "app", "cat", "/which").out == "A"  # from the lookup cache
    kiln("import", str(_rootfs_with(busybox_rootfs, tmp_path, "b", "B")), "app")
    assert kiln("run", "--rm", "app", "cat", "/which").out == "B"
    assert kiln("run", "--rm", "app", "cat", "/which").out == "B"


def test_a_removed_image_is_not_run_from_the_cache(kiln, busybox_rootfs, tmp_path):
    kiln("import", str(_rootfs_with(busybox_rootfs, tmp_path, "a", "A")), "gone")
    assert kiln("run", "--rm", "gone", "true").returncode == 0
    kiln("rmi", "gone")
    p = kiln("run", "--rm", "gone", "true", check=False)
    assert p.returncode == 125 and "is not in the store" in p.err


def test_a_missing_layer_dir_is_unpacked_again(kiln, busybox_rootfs, tmp_path):
    kiln("import", str(_rootfs_with(busybox_rootfs, tmp_path, "a", "A")), "app")
    assert kiln("run", "--rm", "app", "cat", "/which").out == "A"
    layers = _lookup_file(kiln.root)["images"]["app"]["layers"]
    shutil.rmtree(os.path.dirname(layers[0]))  # as if pruned behind this cache's back
    assert kiln("run", "--rm", "app", "cat", "/which").out == "A"
    assert all(os.path.isdir(d) for d in layers)


@pytest.mark.parametrize("damage", ["truncated", "not marshal", "a code object",
                                    "a set for the layers", "bytes for the digest",
                                    "a layer dir elsewhere that is gone", "old json file"])
def test_a_damaged_lookup_cache_is_never_believed(kiln, busybox_rootfs, tmp_path, damage):
    from runtime.image_lookup import MAGIC

    kiln("import", str(_rootfs_with(busybox_rootfs, tmp_path, "a", "A")), "app")
    assert kiln("run", "--rm", "app", "cat", "/which").out == "A"
    path = _lookup_path(kiln.root)
    doc = _lookup_file(kiln.root)
    sound = marshal.loads(marshal.dumps(doc["images"]["app"]))
    entry = doc["images"]["app"]
    data = None
    if damage == "truncated":
        data = path.read_bytes()[:-7]
    elif damage == "not marshal":
        data = MAGIC + b"\xff" * 40
    elif damage == "a code object":
        entry["config"] = {"Cmd": compile("1", "x", "eval")}
    elif damage == "a set for the layers":
        entry["layers"] = set(entry["layers"])
    elif damage == "bytes for the digest":
        entry["digest"] = entry["digest"].encode()
    elif damage == "a layer dir elsewhere that is gone":
        entry["layers"] = [str(tmp_path / "nowhere")]
    else:
        path.unlink()
        path.with_name("images.json").write_text(json.dumps(doc))
    if data is None and damage != "old json file":
        data = MAGIC + marshal.dumps(doc)
    if data is not None:
        path.write_bytes(data)
    assert kiln("run", "--rm", "app", "cat", "/which").out == "A"
    # resolved the full way, which wrote the sound answer back (a believed cache is not
    # written again)
    assert _lookup_file(kiln.root)["images"]["app"] == sound


def test_names_resolved_without_a_tag_are_not_kept(kiln, busybox_rootfs, tmp_path):
    digest = kiln("import", str(_rootfs_with(busybox_rootfs, tmp_path, "a", "A")),
                  "app").out.strip()
    kiln("run", "--name", "keeper", "app", "true")  # keeps the untagged image's blobs
    kiln("rmi", "-f", "app")
    ref = f"docker.io/library/app@{digest}"  # now found as a blob only, not in index.json
    assert kiln("run", "--rm", ref, "cat", "/which").out == "A"
    doc = _lookup_file(kiln.root)
    assert ref not in doc["images"]
    kiln("rm", "keeper")
    kiln("prune")
    p = kiln("run", "--rm", ref, "true", check=False)
    assert p.returncode == 125 and "is not in the store" in p.err


def test_default_root_is_the_stores():
    code = ("import json, os, sys; import runtime.containers as c, store.store as s; "
            "os.geteuid = (lambda: int(sys.argv[1])); "
            "print(json.dumps([c.default_root(), str(s.default_root())]))")
    for euid, env in [(0, {"KILN_ROOT": "/x/y"}), (0, {"KILN_ROOT": ""}), (0, {}),
                      (1000, {"XDG_DATA_HOME": "/xdg"}), (1000, {"HOME": "/home/u"})]:
        full = {k: v for k, v in os.environ.items()
                if k not in ("KILN_ROOT", "XDG_DATA_HOME")} | env
        out = subprocess.run([sys.executable, "-c", code, str(euid)], env=full, cwd=PROJECT,
                             capture_output=True, text=True, check=True).stdout
        mine, stores = json.loads(out)
        assert mine == stores, (euid, env)


# -- the cgroup warm-up --------------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() != 0, reason="moves a process between cgroups")
def test_warm_up_leaves_kiln_in_its_own_cgroup():
    from runtime.cgroups import warm_up_migration

    with open("/proc/self/cgroup") as f:
        before = f.read()
    warm_up_migration()
    time.sleep(0.2)  # the thread's write is done by now, however slow the grace period
    with open("/proc/self/cgroup") as f:
        assert f.read() == before


# -- the spec's plain classes --------------------------------------------------------------
def test_spec_values_compare_hash_and_refuse_changes_like_frozen_dataclasses():
    from runtime.cgroups import Limits
    from runtime.rootfs import LayeredBind
    from runtime.spec import BindMount, ProcessSpec, TmpfsMount

    a, b = BindMount("/h", "/c", True), BindMount("/h", "/c", readonly=True)
    assert a == b and hash(a) == hash(b) and a != BindMount("/h", "/c")
    assert repr(a) == "BindMount(source='/h', target='/c', readonly=True, subpath='')"
    with pytest.raises(AttributeError):
        a.source = "/elsewhere"
    layered = LayeredBind("/", "/mnt", False, layers=("/l1",), upper="/u", work="/w",
                          scratch="/s")
    assert layered != BindMount("/", "/mnt") and isinstance(layered, BindMount)
    assert {layered, LayeredBind("/", "/mnt", False, ("/l1",), "/u", "/w", "/s")} == {layered}
    assert TmpfsMount("/t").options == "rw,nosuid,nodev,noexec,size=65536k"
    assert Limits(memory=1, warnings=("x",)) == Limits(memory=1)  # warnings are no part of it
    p = ProcessSpec(["true"])
    p.env.append("A=1")
    assert ProcessSpec(["true"]).env == [] and p != ProcessSpec(["true"])
