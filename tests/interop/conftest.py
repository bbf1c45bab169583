"""Shared setup of the interop suite: real third-party tools against kiln's output.

Everything heavy is session-scoped and read-only once made: one kiln store with
busybox imported through the CLI, the archives ``kiln save`` writes from it, and
one isolated containers-storage (podman, buildah and skopeo all point at it through
a private containers.conf and storage.conf; images never go to /var/lib/containers and
/etc/containers is not written). Two host paths stay out of reach as root: skopeo's
blob-info cache (/var/lib/containers/cache) and netavark's empty /run/containers/networks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import KilnCLI

BUSYBOX = "docker.io/library/busybox:latest"
TOOL_TIMEOUT = 120


def require_tool(name: str) -> str:
    """The tool's path; skip loudly when it is missing (in CI that skip is a bug)."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None)
    if path is None:
        pytest.skip(f"INTEROP TEST NOT RUN: {name} is not installed "
                    "(tests/setup-and-run.sh installs it; in CI this skip is a bug)")
    return path


def run_tool(args: Sequence[str], *, env: dict | None = None, check: bool = True,
             timeout: int = TOOL_TIMEOUT, cwd: Path | None = None
             ) -> subprocess.CompletedProcess:
    """Run a third-party tool; on failure the assertion shows its command and stderr."""
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=timeout, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {p.returncode}:\n"
                             f"stdout: {p.stdout[-3000:]}\nstderr: {p.stderr[-3000:]}")
    return p


def kiln_inspect(kiln: KilnCLI, name: str) -> dict:
    return json.loads(kiln("inspect", name).out)[0]


def layout_blob(layout: Path, digest: str) -> bytes:
    algo, _, hexpart = digest.partition(":")
    return (layout / "blobs" / algo / hexpart).read_bytes()


# ------------------------------------------------------------------ comparing trees


def tree_view(root: Path) -> dict[str, tuple]:
    """What a container sees: names, type+mode, owner, link target, content, device, xattrs.

    Directory mtimes are left out (extracting a child touches its parent); file mtimes,
    which a layer tar carries, are kept.
    """
    view = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            if kind == stat.S_IFLNK:
                what: object = os.readlink(path)
            elif kind == stat.S_IFREG:
                with open(path, "rb") as f:
                    what = hashlib.sha256(f.read()).hexdigest()
            elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                what = (os.major(st.st_rdev), os.minor(st.st_rdev))
            else:
                what = None
            xattrs = tuple(sorted(
                (x, os.getxattr(path, x, follow_symlinks=False))
                for x in os.listxattr(path, follow_symlinks=False)
                if not x.startswith("trusted.overlay.")))
            mtime = None if kind == stat.S_IFDIR else st.st_mtime_ns // 1_000_000_000
            view[os.path.relpath(path, root)] = (oct(st.st_mode), st.st_uid, st.st_gid, what,
                                                 xattrs, mtime)
    return view


def differences(got: dict, want: dict, *, got_by: str = "umoci", want_by: str = "kiln"
                ) -> list[str]:
    """Every path whose tree_view entry differs, readable in a failed assertion."""
    out = [f"only from {got_by}: {k} {got[k]}" for k in sorted(set(got) - set(want))]
    out += [f"only from {want_by}: {k} {want[k]}" for k in sorted(set(want) - set(got))]
    out += [f"{k}: {got_by} {got[k]} != {want_by} {want[k]}"
            for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    return out


def umoci_unpack(layout: Path, ref: str, bundle: Path) -> Path:
    run_tool([require_tool("umoci"), "unpack", "--image", f"{layout}:{ref}", str(bundle)])
    return bundle / "rootfs"


@contextmanager
def overlay_of(lowerdirs: list[Path], mountpoint: Path):
    """Read-only overlay of kiln's layer dirs (top first): the view ``kiln run`` builds."""
    mountpoint.mkdir()
    opts = "ro,lowerdir=" + ":".join(str(d) for d in lowerdirs)
    p = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mountpoint)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.fail(f"cannot mount an overlay of kiln's layer dirs: {p.stderr}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def layer_dirs(kiln, name: str) -> list[Path]:
    info = json.loads(kiln("inspect", name).out)[0]
    return [kiln.root / "layers" / la["DiffID"].split(":")[1] / "diff" for la in info["Layers"]]


# ------------------------------------------------------------------ kiln artifacts


@pytest.fixture(scope="session")
def interop_dir(tmp_path_factory) -> Path:
    if os.geteuid() != 0:
        pytest.fail("the interop tests run podman, buildah, umoci and mount as root: "
                    "run them as root (tests/setup-and-run.sh does), or deselect with "
                    "-m 'not interop'")
    return tmp_path_factory.mktemp("interop")


@pytest.fixture(scope="session")
def busybox_kiln(interop_dir, busybox_rootfs) -> KilnCLI:
    """A kiln store (default zstd layers) holding busybox:latest, imported with the CLI."""
    kiln = KilnCLI(interop_dir / "kiln-root")
    kiln("import", str(busybox_rootfs), "busybox:latest")
    return kiln


@pytest.fixture(scope="session")
def busybox_info(busybox_kiln) -> dict:
    """``kiln inspect busybox:latest``."""
    return kiln_inspect(busybox_kiln, "busybox:latest")


def _save(kiln: KilnCLI, out: Path, fmt: str, *compression: str) -> Path:
    kiln("save", "-q", "busybox:latest", "-o", str(out), "--format", fmt, *compression)
    return out


@pytest.fixture(scope="session")
def saved_oci_gzip(busybox_kiln, interop_dir) -> Path:
    return _save(busybox_kiln, interop_dir / "saved-oci-gzip", "oci",
                 "--compression-format", "gzip")


@pytest.fixture(scope="session")
def saved_oci_zstd(busybox_kiln, interop_dir) -> Path:
    return _save(busybox_kiln, interop_dir / "saved-oci-zstd", "oci")


@pytest.fixture(scope="session")
def saved_oci_archive(busybox_kiln, interop_dir) -> Path:
    return _save(busybox_kiln, interop_dir / "saved.oci.tar", "oci-archive")


@pytest.fixture(scope="session")
def saved_docker_archive(busybox_kiln, interop_dir) -> Path:
    return _save(busybox_kiln, interop_dir / "saved.docker.tar", "docker-archive")


# ------------------------------------------------------------------ containers-storage


CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "{tmp}"
[network]
network_config_dir = "{net}"
"""

STORAGE_CONF = """\
[storage]
driver = "{driver}"
graphroot = "{root}"
runroot = "{runroot}"
"""


def _filesystem_type(path: Path) -> str:
    p = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return p.stdout.strip()


@dataclass
class ContainerTools:
    """podman, buildah and skopeo over one private containers-storage."""

    base: Path
    runroot: Path
    driver: str
    env: dict = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.base / "storage"

    def _storage_flags(self) -> list[str]:
        return ["--root", str(self.root), "--runroot", str(self.runroot),
                "--storage-driver", self.driver]

    def podman_argv(self, *args: str) -> list[str]:
        """podman's command line on this storage, for a test that runs it itself (a pipe),
        with ``environ()``."""
        return [require_tool("podman"), *self._storage_flags(),
                "--tmpdir", str(self.base / "podman-tmp"),
                "--network-config-dir", str(self.base / "net"),
                "--events-backend", "file", "--cgroup-manager", "cgroupfs", *args]

    def environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run_tool(self.podman_argv(*args), env=self.env, check=check)

    def buildah(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run_tool([require_tool("buildah"), *self._storage_flags(), *args],
                        env=self.env, check=check)

    def skopeo(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run_tool([require_tool("skopeo"), *args], env=self.env, check=check)

    def storage_ref(self, name: str) -> str:
        """A skopeo reference to ``name`` in this storage, never the host's."""
        return f"containers-storage:[{self.driver}@{self.root}+{self.runroot}]{name}"


def private_container_tools(base: Path, runroot_prefix: str = "kb-") -> ContainerTools:
    """buildah/podman/skopeo on an overlay containers-storage of their own under ``base``
    (made here), configured like the host's but for paths; the run root goes under /tmp
    (podman limits its length)."""
    for sub in ("storage", "podman-tmp", "net"):
        (base / sub).mkdir(parents=True)
    runroot = Path(tempfile.mkdtemp(prefix=runroot_prefix, dir="/tmp"))
    (base / "containers.conf").write_text(CONTAINERS_CONF.format(tmp=base / "podman-tmp",
                                                                 net=base / "net"))
    (base / "storage.conf").write_text(STORAGE_CONF.format(driver="overlay",
                                                           root=base / "storage",
                                                           runroot=runroot))
    return ContainerTools(base, runroot, "overlay", env={
        "CONTAINERS_CONF": str(base / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(base / "storage.conf"),
        "XDG_CONFIG_HOME": str(base / "xdg-config")})


@contextmanager
def busybox_in_kiln_and_buildah(tools: ContainerTools, busybox_rootfs: Path,
                                work: Path) -> Iterator[KilnCLI]:
    """A kiln store under ``work`` holding busybox, and the same image (kiln's own
    oci-archive of it) in ``tools``' storage as BUSYBOX, so that kiln and buildah build from
    one base. The storage is shared with the other interop modules: on leaving, the images
    built meanwhile (--layers' unnamed step images too) go, and the base only loses its name
    (another module may hold the same image under another one)."""
    kiln = KilnCLI(work / "kiln-root")
    kiln("import", str(busybox_rootfs), "busybox:latest")
    archive = work / "busybox.oci.tar"
    kiln("save", "-q", "busybox:latest", "-o", str(archive), "--format", "oci-archive")
    tools.skopeo("--insecure-policy", "copy", f"oci-archive:{archive}:{BUSYBOX}",
                 tools.storage_ref(BUSYBOX))
    before = _buildah_image_ids(tools)
    try:
        yield kiln
    finally:
        new = _buildah_image_ids(tools) - before
        if new:
            tools.buildah("rmi", "--force", *new, check=False)
        tools.buildah("rmi", BUSYBOX, check=False)


def _buildah_image_ids(tools: ContainerTools) -> set[str]:
    return set(tools.buildah("images", "--all", "--quiet", "--no-trunc").stdout.split())


def make_container_tools(base: Path) -> ContainerTools:
    """podman, buildah and skopeo over a new containers-storage in ``base``."""
    for sub in ("storage", "podman-tmp", "net"):
        (base / sub).mkdir(parents=True)
    # podman refuses a runroot longer than 50 characters; pytest's tmp paths are longer
    runroot = Path(tempfile.mkdtemp(prefix="kiln-interop-"))
    # overlay cannot sit on overlayfs (e.g. when the tests themselves run in a container)
    driver = "vfs" if _filesystem_type(base) == "overlayfs" else "overlay"
    (base / "containers.conf").write_text(CONTAINERS_CONF.format(
        tmp=base / "podman-tmp", net=base / "net"))
    (base / "storage.conf").write_text(STORAGE_CONF.format(
        driver=driver, root=base / "storage", runroot=runroot))
    return ContainerTools(base, runroot, driver, env={
        # Only these files are read: the host's /etc/containers configuration is ignored.
        "CONTAINERS_CONF": str(base / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(base / "storage.conf"),
        "XDG_CONFIG_HOME": str(base / "xdg-config"),
    })


def remove_container_tools(tools: ContainerTools) -> None:
    """What ``tools`` left running or mounted goes; the storage files stay."""
    if shutil.which("buildah"):
        tools.buildah("rm", "--all", check=False)
    if shutil.which("podman"):
        tools.podman("rm", "--all", "--force", check=False)
    _unmount_under(tools.base)
    _unmount_under(tools.runroot)
    shutil.rmtree(tools.runroot, ignore_errors=True)


@pytest.fixture(scope="session")
def container_tools(interop_dir) -> Iterator[ContainerTools]:
    tools = make_container_tools(interop_dir / "containers")
    yield tools
    remove_container_tools(tools)


def _unmount_under(base: Path) -> None:
    """Whatever the storage driver left mounted below ``base`` (deepest first)."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    prefix = str(base) + "/"
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
