from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
CORPORA = PROJECT.parent / "shared" / "corpora"


# kiln's packages and its dependencies as a directory for PYTHONPATH: what another user,
# or a container with the host's /usr, runs with Debian's /usr/bin/python3 (the test
# run's venv may live under root's home, which neither can enter)
KILN_PACKAGES = ("kiln", "builder", "store", "runtime", "registry_client")
KILN_DEPENDENCIES = ("requests", "urllib3", "idna", "certifi", "charset_normalizer",
                     "zstandard", "cryptography", "cffi", "_cffi_backend", "pycparser",
                     "click", "tqdm", "nacl")
SYSTEM_PYTHON = "/usr/bin/python3"


def copy_kiln(dest: Path) -> Path:
    """kiln and its dependencies under ``dest`` (readable by all); fails the test when
    SYSTEM_PYTHON is not the test run's Python version (the compiled modules would not load)."""
    import importlib.util

    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    if version != str(sys.version_info[:2]):
        pytest.fail(f"{SYSTEM_PYTHON} is Python {version}, the tests' is "
                    f"{sys.version_info[:2]}: the dependencies' compiled modules would not load")
    for package in KILN_PACKAGES:
        shutil.copytree(PROJECT / package, dest / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in KILN_DEPENDENCIES:
        origin = Path(importlib.util.find_spec(name).origin)
        if origin.name == "__init__.py":
            shutil.copytree(origin.parent, dest / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, dest / origin.name)
    subprocess.run(["chmod", "-R", "a+rX", str(dest)], check=True)
    return dest


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory) -> Path:
    """A busybox root filesystem from Debian's busybox-static (the tests' base image)."""
    if not shutil.which("busybox") and not os.path.exists("/bin/busybox"):
        pytest.fail("busybox-static is not installed (tests/setup-and-run.sh installs it)")
    root = tmp_path_factory.mktemp("busybox") / "rootfs"
    subprocess.run(["sh", str(PROJECT / "Containerfiles" / "busybox-rootfs.sh"), str(root)],
                   check=True)
    return root


@pytest.fixture
def store(tmp_path):
    from store.store import Store

    return Store(tmp_path / "root")


@pytest.fixture
def busybox_store(store, busybox_rootfs):
    from store.importer import import_rootfs

    import_rootfs(store, busybox_rootfs, "busybox:latest", epoch=0)
    return store


def in_private_mount_ns(fn) -> str:
    """``fn()`` run in a forked child with a mount namespace of its own (so the mounts it
    makes vanish with it); its string result, or ``error: ...`` if it raised."""
    from runtime import syscalls as sc

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            sc.unshare(sc.CLONE_NEWNS)
            sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
            os.write(w, fn().encode())
        except BaseException as e:
            os.write(w, f"error: {e!r}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


class KilnCLI:
    def __init__(self, root: Path):
        self.root = root

    def argv(self, *args: str) -> list[str]:
        """The command line of ``kiln ARGS``, for a test that runs it itself (a pipe)."""
        return [sys.executable, "-m", "kiln", *args]

    def environ(self, env: dict | None = None) -> dict[str, str]:
        return {**os.environ, "KILN_ROOT": str(self.root), **(env or {})}

    def __call__(self, *args: str, check: bool = True, input: bytes | None = None,
                 env: dict | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run(self.argv(*args), capture_output=True, env=self.environ(env),
                           input=input, cwd=PROJECT)
        p.out = p.stdout.decode(errors="replace")  # type: ignore[attr-defined]
        p.err = p.stderr.decode()  # type: ignore[attr-defined]
        if check and p.returncode != 0:
            raise AssertionError(f"kiln {' '.join(args)} failed ({p.returncode}):\n{p.err}")
        return p


@pytest.fixture
def kiln(tmp_path) -> KilnCLI:
    return KilnCLI(tmp_path / "root")


def tree_snapshot(root: Path) -> dict:
    """Everything observable about a tree: names, types, modes, owners, sizes, contents, links."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            entry = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)
            if os.path.islink(p):
                entry += (os.readlink(p),)
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    entry += (f.read(),)
            snap[os.path.relpath(p, root)] = entry
    return snap


def tar_of(entries: list[tuple[str, str, str | bytes]]) -> bytes:
    """An uncompressed PAX tar of (name, "file", bytes) and (name, "sym", target) entries,
    root-owned with the tar module's default modes, all dated 2001-09-09."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, data in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_000_000_000
            if kind == "file":
                assert isinstance(data, bytes)
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
            else:
                ti.type, ti.linkname = tarfile.SYMTYPE, str(data)
                t.addfile(ti)
    return buf.getvalue()


def user_xattrs_work(directory: Path) -> bool:
    """Whether the file system of ``directory`` takes user.* extended attributes."""
    probe = directory / "xattr-probe"
    probe.write_text("")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()
