"""Rootless kiln: a real non-root user with /etc/subuid ranges builds, runs, pulls and pushes.

The user (``kiln-rootless``, made here with useradd, which gives it subordinate ranges)
runs kiln with Debian's /usr/bin/python3 from a world-readable copy of the source and of
the test run's own copies of kiln's dependencies (its venv may live under root's home,
which the user cannot enter).
Everything is real: newuidmap/newgidmap, the pause process, overlay mounts in the user
namespace, slirp4netns, a docker-registry on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import PROJECT, SYSTEM_PYTHON, KilnCLI, copy_kiln
from tests.registry.conftest import registry  # noqa: F401 - the fixture
from tests.registry.servers import REGISTRY_BIN

USER = "kiln-rootless"
PYTHON = SYSTEM_PYTHON
EPOCH = "1700000000"


def _ensure_user(name: str = USER) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
        return pwd.getpwnam(name)


def _has_range(path: str, entry: pwd.struct_passwd) -> bool:
    with open(path) as f:
        return any(line.split(":")[0] in (entry.pw_name, str(entry.pw_uid)) for line in f)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """(passwd entry, source dir, shared scratch dir) of the rootless user."""
    for tool in ("newuidmap", "newgidmap", "slirp4netns", "runuser"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing (tests/setup-and-run.sh installs uidmap, "
                        "slirp4netns)")
    entry = _ensure_user()
    for path in ("/etc/subuid", "/etc/subgid"):
        if not _has_range(path, entry):
            with open(path, "a") as f:
                f.write(f"{USER}:300000:65536\n")
    # A Debian machine's udev makes /dev/net/tun 0666 (slirp4netns and pasta need it);
    # a container or VM without udev may leave the kernel's 0600.
    if os.stat("/dev/net/tun").st_mode & 0o777 != 0o666:
        os.chmod("/dev/net/tun", 0o666)
    shared = Path(tempfile.mkdtemp(prefix="kiln-rootless-", dir="/var/tmp"))
    os.chmod(shared, 0o755)
    source = copy_kiln(shared / "src")
    _stop_user_processes()
    yield entry, source, shared
    _stop_user_processes()
    shutil.rmtree(shared, ignore_errors=True)


def _stop_user_processes() -> None:
    subprocess.run(["pkill", "-KILL", "-u", USER], capture_output=True)
    for _ in range(50):
        if subprocess.run(["pgrep", "-u", USER], capture_output=True).returncode != 0:
            return
        time.sleep(0.1)


class RootlessKiln:
    def __init__(self, entry: pwd.struct_passwd, source: Path, data_home: Path):
        self.entry, self.source, self.data_home = entry, source, data_home
        self.user = entry.pw_name

    def __call__(self, *args: str, check: bool = True, env: dict | None = None,
                 cwd: str = "/", timeout: float = 120) -> subprocess.CompletedProcess:
        environ = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": self.entry.pw_dir,
                   "XDG_DATA_HOME": str(self.data_home), "PYTHONPATH": str(self.source),
                   "LANG": "C.UTF-8", **(env or {})}
        p = subprocess.run(["runuser", "-u", self.user, "--", "env", "-i",
                            *[f"{k}={v}" for k, v in environ.items()],
                            PYTHON, "-m", "kiln", *args],
                           capture_output=True, cwd=cwd, timeout=timeout)
        p.out = p.stdout.decode(errors="replace")  # type: ignore[attr-defined]
        p.err = p.stderr.decode(errors="replace")  # type: ignore[attr-defined]
        if check and p.returncode != 0:
            raise AssertionError(f"rootless kiln {' '.join(args)} failed ({p.returncode}):"
                                 f"\n{p.out}\n{p.err}")
        return p


@pytest.fixture(scope="module")
def rootless(user, busybox_rootfs):
    """A rootless kiln with busybox imported from a tarball (owners as root made them)."""
    entry, source, shared = user
    data_home = Path(entry.pw_dir) / "kiln-test-data"
    if data_home.exists():
        shutil.rmtree(data_home)
    data_home.mkdir()
    os.chown(data_home, entry.pw_uid, entry.pw_gid)
    tarball = shared / "busybox.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(busybox_rootfs, arcname=".")
    os.chmod(tarball, 0o644)
    kiln = RootlessKiln(entry, source, data_home)
    kiln("import", str(tarball), "busybox:latest")
    yield kiln
    _stop_user_processes()
    shutil.rmtree(data_home, ignore_errors=True)


def _context(shared: Path, name: str, containerfile: str, files: dict | None = None) -> Path:
    ctx = shared / name
    ctx.mkdir()
    (ctx / "Containerfile").write_text(containerfile)
    for rel, text in (files or {}).items():
        (ctx / rel).write_text(text)
    subprocess.run(["chmod", "-R", "a+rX", str(ctx)], check=True)
    return ctx


def _subid_start(path: str, entry: pwd.struct_passwd) -> int:
    with open(path) as f:
        for line in f:
            name, start, _count = line.strip().split(":")
            if name in (entry.pw_name, str(entry.pw_uid)):
                return int(start)
    raise AssertionError(f"no range in {path}")


def test_build_and_run_as_a_user_keep_image_owners_in_the_users_store(rootless, user):
    entry, _source, shared = user
    ctx = _context(shared, "owners", (
        "FROM busybox\n"
        "RUN mkdir /data && echo hi > /data/f && chown 1000:1000 /data/f "
        "&& echo 'app:x:1234:1234::/home/app:/bin/sh' >> /etc/passwd "
        "&& mkdir -p /home/app && chown 1234:1234 /home/app\n"
        "COPY --chown=55:66 note.txt /note.txt\n"
        "RUN rm -rf /etc/network && mkdir /etc/network && touch /etc/network/only\n"
        "USER app\n"
        "RUN id > /home/app/id\n"), {"note.txt": "note\n"})
    built = rootless("build", "-t", "owners", str(ctx))
    assert "--> " in built.out + built.err
    run = rootless("run", "--rm", "owners", "sh", "-c",
                   "stat -c '%u:%g %n' /data/f /note.txt /home/app/id /; cat /home/app/id; "
                   "ls /etc/network; id -u")
    lines = run.out.splitlines()
    assert lines[:4] == ["1000:1000 /data/f", "55:66 /note.txt", "1234:1234 /home/app/id",
                         "0:0 /"], run.out
    assert lines[4].startswith("uid=1234(app) gid=1234"), run.out
    assert lines[5:] == ["only", "1234"], run.out  # the opaque dir hid the old files
    # the store is the user's ($XDG_DATA_HOME/kiln), its files owned on the host by the
    # user (image root) and by the user's subordinate ids (everything else)
    store = rootless.data_home / "kiln"
    assert (store / "index.json").exists()
    sub = _subid_start("/etc/subuid", entry) - 1  # image uid N (N > 0) is sub + N - 1
    owners = {os.lstat(p).st_uid for p in store.rglob("*") if "layers" in p.parts}
    assert {entry.pw_uid, sub + 55, sub + 1000, sub + 1234} <= owners, owners
    assert not any(o == 0 for o in owners), "a layer file is owned by the host's root"
    # one pause process holds the namespace for every call
    pauses = subprocess.run(["pgrep", "-u", USER, "-x", "sleep"], capture_output=True,
                            text=True).stdout.split()
    assert len(pauses) == 1, pauses
    info = json.loads(rootless("info", "--format", "json").out)
    assert info["Rootless"] is True and info["StoreRoot"] == str(store)


def test_detached_container_with_a_published_port_and_its_lifecycle(rootless):
    cid = rootless("run", "-d", "-p", "127.0.0.1::8080", "busybox", "sh", "-c",
                   "mkdir /w && echo hello-rootless > /w/index.html && "
                   "exec httpd -f -p 8080 -h /w").out.strip()
    try:
        port = rootless("port", cid).out.strip().rsplit(":", 1)[1]
        body = None
        for _ in range(50):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    body = r.read()
                break
            except OSError:
                time.sleep(0.1)
        assert body == b"hello-rootless\n"
        # a later call acts on it: exec joins its namespaces, top lists its processes
        ex = rootless("exec", cid, "sh", "-c", "id -u; cat /etc/resolv.conf; ip -4 addr show tap0")
        assert ex.out.startswith("0\n") and "10.0.2.100/24" in ex.out, ex.out
        assert "nameserver" in ex.out
        top = rootless("top", cid)
        assert "httpd -f -p 8080" in top.out, top.out
        slirps = subprocess.run(["pgrep", "-u", USER, "-x", "slirp4netns"],
                                capture_output=True, text=True).stdout.split()
        assert len(slirps) == 1, slirps
    finally:
        rootless("rm", "-f", cid)
    assert subprocess.run(["pgrep", "-u", USER, "-x", "slirp4netns"],
                          capture_output=True).returncode == 1, "slirp4netns outlived rm -f"
    assert cid[:12] not in rootless("ps", "-a").out
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)


def test_the_container_reaches_the_outside_through_slirp(rootless):
    # slirp4netns' gateway forwards to the host's own addresses but not its loopback
    # (--disable-host-loopback, podman's default): a host listener on a non-loopback
    # address of this machine answers
    import socket

    address = _host_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    server = socket.create_server((address, 0))
    port = server.getsockname()[1]
    try:
        import threading

        def answer():
            conn, _ = server.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nout")

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        run = rootless("run", "--rm", "busybox", "wget", "-qO-", f"http://{address}:{port}/")
        assert run.out == "out"
    finally:
        server.close()


def _host_address() -> str | None:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            return fields[fields.index("inet") + 1].split("/")[0]
    return None


def test_limits_without_a_delegated_cgroup_are_one_warning(rootless):
    run = rootless("run", "--rm", "--memory", "64m", "--pids-limit", "50", "busybox",
                   "echo", "ran")
    assert run.out == "ran\n"
    warnings = [line for line in run.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "cgroup" in warnings[0] and "memory" in warnings[0], run.err
    # and a bridge network, which needs root, is a clear error
    bad = rootless("run", "--rm", "--network", "bridge", "busybox", "true", check=False)
    assert bad.returncode == 125 and "rootless" in bad.err, bad.err


def test_pull_build_push_match_the_rootful_build_digests(rootless, user, registry,  # noqa: F811
                                                         busybox_rootfs, tmp_path):
    if not REGISTRY_BIN.exists():
        pytest.fail("docker-registry is missing")
    _entry, _source, shared = user
    base = f"{registry.host}/rootless/busybox:1"
    # root makes the base, pushes it; the user pulls it: both build on the same layers
    root = KilnCLI(tmp_path / "root")
    tarball = shared / "busybox.tar"
    root("import", str(tarball), "busybox:latest")
    root("push", "busybox:latest", base)
    rootless("pull", base)
    rootless("tag", base, "busybox:latest")
    examples = shared / "examples"
    shutil.copytree(PROJECT / "Containerfiles", examples)
    subprocess.run(["chmod", "-R", "a+rX", str(examples)], check=True)
    env = {"SOURCE_DATE_EPOCH": EPOCH}
    for example in ("web", "multistage"):
        tag = f"{registry.host}/rootless/{example}:1"
        root("build", "-t", f"{example}:root", str(examples / example), env=env)
        rootless("build", "-t", tag, str(examples / example), env=env)
        rootful = json.loads(root("inspect", f"{example}:root").out)[0]
        mine = json.loads(rootless("inspect", tag).out)[0]
        assert mine["RootFS"]["diff_ids"] == rootful["RootFS"]["diff_ids"], example
        assert mine["Layers"] == rootful["Layers"], example  # the compressed blobs too
        assert mine["Id"] == rootful["Id"], example
        rootless("push", tag)
        again = root("pull", tag)
        assert again.returncode == 0
        assert json.loads(root("inspect", tag).out)[0]["Id"] == rootful["Id"]
    sel = rootless("run", "--rm", f"{registry.host}/rootless/web:1", "selftest")
    assert sel.returncode == 0, sel.err


def test_a_user_without_subordinate_ranges_gets_one_id_and_a_warning(user, rootless):
    # useradd gives new users ranges: this one's are taken away, as on a host where an
    # administrator made none
    entry = _ensure_user("kiln-rootless-1id")
    for path in ("/etc/subuid", "/etc/subgid"):
        with open(path) as f:
            lines = [line for line in f if line.split(":")[0] != entry.pw_name]
        with open(path, "w") as f:
            f.writelines(lines)
    subprocess.run(["pkill", "-KILL", "-u", entry.pw_name], capture_output=True)
    _entry, source, shared = user
    data_home = Path(entry.pw_dir) / "kiln-test-data"
    shutil.rmtree(data_home, ignore_errors=True)
    data_home.mkdir()
    os.chown(data_home, entry.pw_uid, entry.pw_gid)
    kiln = RootlessKiln(entry, source, data_home)
    try:
        imported = kiln("import", str(shared / "busybox.tar"), "busybox:latest")
        assert imported.err.count("no range for kiln-rootless-1id") == 1, imported.err
        run = kiln("run", "--rm", "busybox", "sh", "-c", "id -u; cat /proc/self/uid_map")
        assert run.out.split() == ["0", "0", str(entry.pw_uid), "1"], run.out
        assert "warning" not in run.err  # said once, when the namespace was made
        bad = kiln("run", "--rm", "busybox", "chown", "1000", "/tmp", check=False)
        assert bad.returncode != 0 and "Invalid argument" in bad.err + bad.out
    finally:
        subprocess.run(["pkill", "-KILL", "-u", entry.pw_name], capture_output=True)
        shutil.rmtree(data_home, ignore_errors=True)
