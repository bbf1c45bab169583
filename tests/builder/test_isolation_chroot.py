"""kiln build --isolation chroot: builds without namespaces or mounts, inside unprivileged
containers (a default ``podman run`` and a default ``kiln run``: no CAP_SYS_ADMIN, the
default seccomp profile), pushing to a registry on the host's loopback.

The containers run Debian's /usr/bin/python3 from the host's /usr (bound read-only) with
a copy of kiln and its dependencies; their store is on a volume, as a CI pod's emptyDir.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import KilnCLI, copy_kiln
from tests.registry.conftest import registry  # noqa: F401 - the fixture

EPOCH = "1700000000"
CONTAINERFILE = """\
FROM busybox
RUN mkdir /data && echo hi > /data/f && chown 1000:1000 /data/f \\
 && echo 'app:x:1234:1234::/home/app:/bin/sh' >> /etc/passwd \\
 && mkdir -p /home/app && chown 1234:1234 /home/app && ln /data/f /data/hard \\
 && ln -s /data/f /data/soft && mkfifo /data/fifo
COPY --chown=55:66 note.txt /note.txt
RUN rm -rf /etc/network && mkdir /etc/network && touch /etc/network/only && rm /bin/vi \\
 && rm /data/soft && mkdir /data/soft && echo gone > /dev/null
USER app
WORKDIR /home/app
RUN id > id && chmod 0600 id
"""
CHECK = ("stat -c '%u:%g %a %h %n' /data/f /data/hard /note.txt /home/app/id /data/soft; "
         "test -p /data/fifo && echo fifo; cat /home/app/id; ls /etc/network; "
         "test -e /bin/vi || echo no-vi")


def _check_lines() -> list[str]:
    return ["1000:1000 644 2 /data/f", "1000:1000 644 2 /data/hard", "55:66 644 1 /note.txt",
            "1234:1234 600 1 /home/app/id", "0:0 755 2 /data/soft", "fifo",
            "uid=1234(app) gid=1234 groups=1234", "only", "no-vi"]


@pytest.fixture(scope="module")
def work(busybox_rootfs):
    """A shared directory: kiln's copy, a busybox tarball, a build context, and a rootfs
    whose /usr is to be the host's."""
    base = Path(tempfile.mkdtemp(prefix="kiln-chroot-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    copy_kiln(base / "src")
    subprocess.run(["tar", "-C", str(busybox_rootfs), "-cf", str(base / "busybox.tar"), "."],
                   check=True)
    ctx = base / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(CONTAINERFILE)
    (ctx / "note.txt").write_text("note\n")
    img = base / "img"
    for d in ("etc", "tmp", "var/tmp", "usr", "work", "root", "proc", "sys", "dev"):
        (img / d).mkdir(parents=True)
    for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"),
                         ("sbin", "usr/sbin")):
        (img / link).symlink_to(target)
    (img / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (img / "etc" / "group").write_text("root:x:0:\n")
    os.chmod(img / "tmp", 0o1777)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _inside_script(registry_host: str, repo: str, cache: str = "") -> str:
    return (
        "set -e; grep CapEff /proc/self/status; "
        "python3 -m kiln import /work/busybox.tar busybox >/dev/null; "
        f"python3 -m kiln build --isolation chroot -t {registry_host}/{repo} {cache} /work/ctx; "
        f"python3 -m kiln push {registry_host}/{repo}")


def _podman(work: Path, script: str) -> subprocess.CompletedProcess:
    """``script`` in a default podman container (the flags a CI job's would have): the
    host's network, /usr and the shared directory, the store on that volume."""
    return subprocess.run(
        ["podman", "run", "--rm", "--network", "host", "-v", "/usr:/usr:ro",
         "-v", f"{work}:/work", "-e", "PYTHONPATH=/work/src",
         "-e", "KILN_ROOT=/work/podman-store", "-e", f"SOURCE_DATE_EPOCH={EPOCH}",
         "localhost/kiln-host-python:1", "/bin/sh", "-c", script],
        capture_output=True, text=True, timeout=300)


def _no_sys_admin(output: str) -> None:
    cap_eff = int(next(line.split()[1] for line in output.splitlines()
                       if line.startswith("CapEff:")), 16)
    assert not cap_eff & (1 << 21), "the build container had CAP_SYS_ADMIN"


def _pulled_and_checked(tmp_path: Path, ref: str) -> dict:
    host = KilnCLI(tmp_path / "host")
    host("pull", ref)
    run = host("run", "--rm", ref, "sh", "-c", CHECK)
    assert run.out.splitlines() == _check_lines(), run.out
    return json.loads(host("inspect", ref).out)[0]


def test_build_and_push_inside_a_default_podman_container(work, registry, tmp_path):  # noqa: F811
    if subprocess.run(["podman", "image", "exists", "localhost/kiln-host-python:1"]
                      ).returncode != 0:
        tar = work / "img.tar"
        subprocess.run(["tar", "-C", str(work / "img"), "-cf", str(tar), "."], check=True)
        subprocess.run(["podman", "import", "-q", str(tar), "localhost/kiln-host-python:1"],
                       check=True, capture_output=True)
    store = work / "podman-store"
    cache = f"{registry.host}/ci/cache:1"
    inside = _podman(work, _inside_script(registry.host, "ci/podman:1",
                                          f"--cache-to type=registry,ref={cache}"))
    assert inside.returncode == 0, inside.stdout + inside.stderr
    _no_sys_admin(inside.stdout)
    # podman's default has no CAP_MKNOD: said once, and the build still went through
    assert inside.stderr.count("no CAP_MKNOD") == 1, inside.stderr
    first = _pulled_and_checked(tmp_path, f"{registry.host}/ci/podman:1")
    # the next job: a fresh container and store, the same Containerfile, the registry's
    # cache: every step CACHED, no RUN, the same image
    shutil.rmtree(store)
    again = _podman(work, _inside_script(registry.host, "ci/podman:2", f"--cache-from {cache}"))
    assert again.returncode == 0, again.stdout + again.stderr
    out = again.stdout + again.stderr
    assert out.count("--> CACHED") == 5 and "no CAP_MKNOD" not in out, out
    host = KilnCLI(tmp_path / "host")
    host("pull", f"{registry.host}/ci/podman:2")
    assert json.loads(host("inspect", f"{registry.host}/ci/podman:2").out)[0]["Id"] == \
        first["Id"]
    shutil.rmtree(store, ignore_errors=True)


def test_build_and_push_inside_a_default_kiln_container(work, registry, tmp_path):  # noqa: F811
    outer = KilnCLI(tmp_path / "outer")
    outer("import", str(work / "img"), "host-python")
    inside = outer("run", "--rm", "--network", "host", "-v", "/usr:/usr:ro",
                   "-v", f"{work}:/work", "-e", "PYTHONPATH=/work/src",
                   "-e", "KILN_ROOT=/work/kiln-store", "-e", f"SOURCE_DATE_EPOCH={EPOCH}",
                   "host-python", "/bin/sh", "-c", _inside_script(registry.host, "ci/kiln:1"),
                   check=False)
    assert inside.returncode == 0, inside.out + inside.err
    _no_sys_admin(inside.out)
    # Docker's default capabilities keep CAP_MKNOD, but kiln's volumes are nodev
    assert inside.err.count("mounted nodev") == 1, inside.err
    info = _pulled_and_checked(tmp_path, f"{registry.host}/ci/kiln:1")
    # the same build, on the host with namespaces and overlays, makes the same layers
    host = KilnCLI(tmp_path / "oci")
    host("import", str(work / "busybox.tar"), "busybox", env={"SOURCE_DATE_EPOCH": EPOCH})
    host("build", "-t", "same", str(work / "ctx"), env={"SOURCE_DATE_EPOCH": EPOCH})
    oci = json.loads(host("inspect", "same").out)[0]
    assert oci["RootFS"]["diff_ids"] == info["RootFS"]["diff_ids"]
    shutil.rmtree(work / "kiln-store", ignore_errors=True)


def test_chroot_and_oci_isolation_make_the_same_layers(work, tmp_path):
    kiln = KilnCLI(tmp_path / "root")
    kiln("import", str(work / "busybox.tar"), "busybox")
    env = {"SOURCE_DATE_EPOCH": EPOCH}
    kiln("build", "--no-cache", "-t", "oci", str(work / "ctx"), env=env)
    chroot = kiln("build", "--no-cache", "--isolation", "chroot", "-t", "chroot",
                  str(work / "ctx"), env=env)
    a, b = json.loads(kiln("inspect", "oci", "chroot").out)
    assert a["Id"] == b["Id"], chroot.err
    # KILN_ISOLATION says it too (as BUILDAH_ISOLATION does), and the step ran unmounted
    again = kiln("build", "--no-cache", "-t", "env", str(work / "ctx"),
                 env={**env, "KILN_ISOLATION": "chroot"})
    assert json.loads(kiln("inspect", "env").out)[0]["Id"] == a["Id"], again.err
    run = kiln("run", "--rm", "chroot", "sh", "-c", CHECK)
    assert run.out.splitlines() == _check_lines()


def test_what_chroot_isolation_cannot_do_is_a_clear_error(work, tmp_path):
    kiln = KilnCLI(tmp_path / "root")
    kiln("import", str(work / "busybox.tar"), "busybox")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(
        "FROM busybox\nRUN echo a\nRUN --mount=type=cache,target=/c touch /c/x\n")
    p = kiln("build", "--isolation", "chroot", str(ctx), check=False)
    assert p.returncode == 125, p.err
    assert f"{ctx}/Containerfile:3" in p.err and "--isolation chroot" in p.err, p.err
    bad = kiln("build", "--isolation", "vm", str(ctx), check=False)
    assert bad.returncode != 0 and "vm" in bad.err
    bad_env = kiln("build", str(ctx), check=False, env={"KILN_ISOLATION": "vm"})
    assert bad_env.returncode == 125 and "KILN_ISOLATION" in bad_env.err, bad_env.err
