"""Two kiln processes on one store at once: both succeed and the store stays consistent."""

import os
import subprocess
import sys

from store.store import Store
from tests.conftest import PROJECT
from tests.store.fsck import check_store


def _kiln(root, *args):
    return subprocess.Popen([sys.executable, "-m", "kiln", "--root", str(root), *args],
                            cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _make_tree(base, n):
    base.mkdir()
    for i in range(n):
        (base / f"f{i}").write_bytes(os.urandom(2000))
    return base


def test_two_imports_at_once(tmp_path, busybox_rootfs):
    root = tmp_path / "root"
    for round_ in range(3):
        procs = [_kiln(root, "import", str(busybox_rootfs), f"bb{round_}:a"),
                 _kiln(root, "import", str(busybox_rootfs), f"bb{round_}:b"),
                 _kiln(root, "import", str(busybox_rootfs), "same:tag")]
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()
    store = Store(root)
    assert check_store(store) == 7
    names = {t.name for t in store.tags()}
    assert "docker.io/library/same:tag" in names and "docker.io/library/bb2:b" in names


def test_import_and_prune_at_once(tmp_path):
    root = tmp_path / "root"
    trees = [_make_tree(tmp_path / f"t{i}", 300) for i in range(4)]
    for round_ in range(4):
        procs = [_kiln(root, "import", str(trees[round_]), f"img:{round_}"),
                 _kiln(root, "prune"),
                 _kiln(root, "prune")]
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()
    store = Store(root)
    assert check_store(store) == 4  # prune never took anything a finished import tagged
    assert os.listdir(root / "tmp") == []
