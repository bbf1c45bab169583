"""kiln run --userns=auto as root: a private id block per container, layers idmapped.

Real /etc/subuid and /etc/subgid entries for ``kiln`` (added here when missing, as an
administrator would), real user namespaces, idmapped mounts and overlay.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import KilnCLI

RANGE = "kiln:3000000:655360\n"  # ten blocks of 65536


@pytest.fixture(scope="module")
def kiln_ranges():
    for path in ("/etc/subuid", "/etc/subgid"):
        with open(path) as f:
            if any(line.startswith("kiln:") for line in f):
                continue
        with open(path, "a") as f:
            f.write(RANGE)


def _first(path: str = "/etc/subuid") -> int:
    with open(path) as f:
        return min(int(line.split(":")[1]) for line in f if line.startswith("kiln:"))


@pytest.fixture(scope="module")
def owned_image(tmp_path_factory, busybox_rootfs, kiln_ranges) -> KilnCLI:
    """busybox plus a file of uid 1000 and a directory only root may enter, built as root.

    The store is under /var/tmp: pytest's own temporary directories are root's alone (0700),
    which the containers' roots, not the host's, may not search (a clear error, tested)."""
    base = Path(tempfile.mkdtemp(prefix="kiln-userns-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    cli = KilnCLI(base / "root")
    cli("import", str(busybox_rootfs), "busybox")
    ctx = tmp_path_factory.mktemp("userns-ctx")
    (ctx / "Containerfile").write_text(
        "FROM busybox\nRUN echo mine > /owned && chown 1000:1001 /owned "
        "&& mkdir -m 0700 /rootonly && echo secret > /rootonly/s\n")
    cli("build", "-t", "owned", str(ctx))
    yield cli
    shutil.rmtree(base, ignore_errors=True)


def _host_uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Uid:")))


def _wait_pid(cli: KilnCLI, cid: str) -> int:
    for _ in range(100):
        info = json.loads(cli("inspect", cid).out)[0]
        if info["State"]["Pid"]:
            return info["State"]["Pid"]
        time.sleep(0.05)
    raise AssertionError("the container never ran")


def test_container_root_is_an_unprivileged_host_uid_and_image_owners_hold(owned_image):
    cli = owned_image
    run = cli("run", "--rm", "--userns=auto", "owned", "sh", "-c",
              "id -u; cat /proc/self/uid_map; stat -c '%u:%g %n' / /owned /rootonly/s "
              "/etc/passwd; cat /rootonly/s; echo new > /made; stat -c '%u %n' /made")
    lines = run.out.split("\n")
    assert lines[0] == "0"
    first = int(lines[1].split()[1])
    assert lines[1].split() == ["0", str(first), "65536"] and first >= _first()
    # the image's owners through the idmapped layers: root's files are root's, 1000's 1000's
    assert lines[2:6] == ["0:0 /", "1000:1001 /owned", "0:0 /rootonly/s", "0:0 /etc/passwd"]
    assert lines[6:8] == ["secret", "0 /made"], run.out
    # a host directory only the host's root may read is closed to the container's root
    secret = Path(cli.root).parent / "hostonly"  # in a directory others may search
    secret.mkdir(mode=0o700)
    (secret / "key").write_text("host secret")
    (secret / "key").chmod(0o600)  # the host root's alone
    secret.chmod(0o711)
    probe = cli("run", "--rm", "--userns=auto", "-v", f"{secret}:/mnt", "owned",
                "cat", "/mnt/key", check=False)
    assert probe.returncode != 0 and "host secret" not in probe.out
    assert "Permission denied" in probe.err + probe.out, probe.err
    plain = cli("run", "--rm", "-v", f"{secret}:/mnt", "owned", "cat", "/mnt/key")
    assert plain.out == "host secret"


def test_a_store_the_containers_root_cannot_reach_is_a_clear_error(owned_image, tmp_path):
    # tmp_path lies under pytest's 0700 directory of root's
    store = tmp_path / "store"
    cli = KilnCLI(store)
    cli("load", "-i", "-", input=owned_image("save", "owned").stdout)
    p = cli("run", "--rm", "--userns=auto", "owned", "true", check=False)
    assert p.returncode == 125 and "not searchable by others" in p.err, p.err
    assert not [p for p in (store / "containers").iterdir() if not p.name.startswith(".")]


def test_blocks_are_private_kept_until_rm_and_exec_joins(owned_image):
    cli = owned_image
    a = cli("run", "-d", "--userns=auto", "owned", "sleep", "60").out.strip()
    b = cli("run", "-d", "--userns=auto:size=4096", "owned", "sleep", "60").out.strip()
    try:
        pa, pb = _wait_pid(cli, a), _wait_pid(cli, b)
        ua, ub = _host_uid(pa), _host_uid(pb)
        assert ua != 0 and ub != 0 and ua != ub
        assert not (ua <= ub < ua + 65536) and not (ub <= ua < ub + 4096)
        info = json.loads(cli("inspect", b).out)[0]["HostConfig"]
        assert info["UsernsMode"] == "auto:size=4096"
        assert info["IDMappings"]["UidMap"] == [f"0:{ub}:4096"]
        # exec joins the container's user namespace first: same root, same ids
        ex = cli("exec", a, "sh", "-c", "id -u; cat /proc/self/uid_map; stat -c %u /owned")
        assert ex.out.split() == ["0", "0", str(ua), "65536", "1000"]
        # what the container wrote is owned by its block on the host; the layers untouched
        cli("exec", a, "sh", "-c", "echo x > /written")
        root = Path(cli.root)
        assert os.stat(root / "containers" / a / "upper" / "written").st_uid == ua
        layer_files = [p for p in (root / "layers").rglob("owned")]
        assert layer_files and all(os.stat(p).st_uid == 1000 for p in layer_files)
        # a stopped container keeps its block (its upper dir's owners), and gets it again
        cli("stop", "-t", "1", a)
        c = cli("run", "-d", "--userns=auto", "owned", "sleep", "60").out.strip()
        uc = _host_uid(_wait_pid(cli, c))
        assert not (ua <= uc < ua + 65536)
        cli("start", a)
        assert _host_uid(_wait_pid(cli, a)) == ua
        cli("rm", "-f", c)
    finally:
        cli("rm", "-f", a, b, check=False)
    # once removed, the lowest block is free again
    d = cli("run", "--rm", "--userns=auto", "owned", "sh", "-c", "cat /proc/self/uid_map")
    assert int(d.out.split()[1]) == min(ua, ub, _first())


@pytest.mark.parametrize("flags, message", [
    (["--userns=bogus"], "invalid --userns 'bogus'"),
    (["--userns=auto:size=0"], "size=N"),
    (["--userns=auto:uidmapping=0:1:2"], "size=N"),
    (["--userns=auto", "--privileged"], "conflict"),
])
def test_bad_userns_options_are_clear_errors(owned_image, flags, message):
    before = set(os.listdir(Path(owned_image.root) / "containers"))
    p = owned_image("run", "--rm", *flags, "owned", "true", check=False)
    assert p.returncode == 125 and message in p.err, p.err
    assert set(os.listdir(Path(owned_image.root) / "containers")) == before


def test_without_a_kiln_range_or_with_all_blocks_taken(tmp_path):
    from runtime.userns import UsernsError, allocate

    sub = tmp_path / "subuid"
    sub.write_text("someone:100000:65536\n")
    with pytest.raises(UsernsError, match="needs a range for 'kiln'"):
        allocate(65536, [], subuid=str(sub), subgid=str(sub))
    sub.write_text("kiln:100000:131072\n")
    assert allocate(65536, [], subuid=str(sub), subgid=str(sub)) == (100000, 65536)
    assert allocate(65536, [(100000, 100)], subuid=str(sub), subgid=str(sub)) == (100100, 65536)
    with pytest.raises(UsernsError, match="no free block"):
        allocate(65536, [(100000, 65536), (165536, 10)], subuid=str(sub), subgid=str(sub))


def test_the_layers_are_never_written_through_a_container(owned_image):
    # the idmapped lower layers are read-only to overlayfs; deleting an image file in the
    # container leaves a whiteout in its upper dir only
    cli = owned_image
    cli("run", "--rm", "--userns=auto", "owned", "sh", "-c", "rm /owned && ! test -e /owned")
    again = cli("run", "--rm", "--userns=auto", "owned", "cat", "/owned")
    assert again.out == "mine\n"
    assert subprocess.run(["findmnt", "-rn", "-t", "overlay"], capture_output=True,
                          text=True).stdout.count(str(cli.root)) == 0, "a mount leaked"
