"""--isolation chroot: build steps without namespaces or mounts, for unprivileged CI pods.

Where kiln itself runs in a container without CAP_SYS_ADMIN (a Kubernetes pod, a default
``podman run``/``docker run``), it can neither mount an overlay nor make namespaces. As
buildah's chroot isolation and kaniko do, each step then works on a plain directory:

- ``materialize`` copies the layer dirs, bottom first, into one tree (whiteouts delete,
  opaque dirs empty what lies below);
- ``snapshot`` records every entry's inode, times, size, mode and owners; after the step
  ``diff_into`` writes what changed into an upper dir as overlayfs would have (new and
  changed entries with their parents, a whiteout for each entry gone), and the layer is
  written from it as from any upper dir;
- a RUN step runs chroot()ed into the tree, with the step's user, Docker's capabilities
  and seccomp profile where kiln may set them, in kiln's own network and cgroup.

What needs mounts is refused with a clear error (RUN --mount); /dev holds only the nodes
kiln may make, /proc and /sys are absent. This is no sandbox: a step runs as the build
container's root and may leave a chroot; the container around kiln is the isolation. The
store must be on a filesystem that takes overlay whiteouts (a volume, not the container's
own overlay root).
"""

from __future__ import annotations

import errno
import os
import stat

from runtime.process import Container, ContainerStartError
from runtime.spec import ContainerSpec
from store.errors import KilnError
from store.fsutil import overlay_xattr_prefix

ENV = "KILN_ISOLATION"
# not part of a step's changes: what a mounting sandbox has mounted there (the builder's
# _STUBS), and the files kiln puts in place of those mounts
SKIPPED = ("proc", "sys", "dev")
_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
            ("urandom", 1, 9), ("tty", 5, 0))


def enabled() -> bool:
    return os.environ.get(ENV) == "chroot"


class ChrootError(KilnError):
    pass


# ---------------------------------------------------------------- layers -> one tree
def _opaque(path: str) -> bool:
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        import shutil

        shutil.rmtree(path)
    else:
        os.unlink(path)


def _copy_meta(st: os.stat_result, src: str, dst: str) -> None:
    from store.fsutil import is_overlay_xattr

    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError:
        names = []
    for name in names:
        if is_overlay_xattr(name) or name.startswith("trusted."):
            continue
        try:
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False),
                        follow_symlinks=False)
        except OSError:
            pass  # as buildah's vfs copy: an attribute this filesystem refuses is dropped
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _copy_entry(st: os.stat_result, src: str, dst: str, links: dict) -> None:
    """One non-directory entry; ``links`` maps (dev, ino) of a source with nlink > 1 to its
    first copy, so hard links stay links."""
    mode = st.st_mode
    key = (st.st_dev, st.st_ino)
    if st.st_nlink > 1 and not stat.S_ISDIR(mode) and key in links:
        os.link(links[key], dst)
        return
    if stat.S_ISREG(mode):
        import shutil

        shutil.copyfile(src, dst, follow_symlinks=False)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISFIFO(mode):
        os.mkfifo(dst)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        try:
            os.mknod(dst, mode, st.st_rdev)
        except PermissionError:
            return  # no CAP_MKNOD: an image's device node is left out, as rootless tools do
    else:
        return  # a socket: nothing to copy
    _copy_meta(st, src, dst)
    if st.st_nlink > 1:
        links[key] = dst


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def materialize(layers: list[str], dest: str) -> None:
    """The merged tree of ``layers`` (bottom first, as overlayfs would show it) at ``dest``."""
    os.makedirs(dest, exist_ok=True)
    for layer in layers:
        links: dict = {}
        _apply_dir(layer, dest, links, top=True)


def _apply_dir(src: str, dst: str, links: dict, top: bool = False) -> None:
    dirs = []
    with os.scandir(src) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        s, d = entry.path, os.path.join(dst, entry.name)
        st = entry.stat(follow_symlinks=False)
        if _is_whiteout(st):
            _remove(d)
            continue
        if stat.S_ISDIR(st.st_mode):
            try:
                existing = os.lstat(d)
            except FileNotFoundError:
                existing = None
            if existing is not None and (not stat.S_ISDIR(existing.st_mode) or _opaque(s)):
                _remove(d)
                existing = None
            if existing is None:
                os.mkdir(d, 0o700)
            _apply_dir(s, d, links)
            dirs.append((st, s, d))
            continue
        _remove(d)
        _copy_entry(st, s, d, links)
    for st, s, d in dirs:  # after their contents: the mtimes stick
        _copy_meta(st, s, d)
    if top:
        _copy_meta(os.lstat(src), src, dst)


# ---------------------------------------------------------------- the step's changes
def _signature(st: os.stat_result) -> tuple:
    return (st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
            st.st_ctime_ns, st.st_rdev, st.st_nlink)


def snapshot(root: str, skipped: tuple[str, ...] = SKIPPED) -> dict[str, tuple]:
    """relative path -> signature of every entry below ``root`` (not the ``skipped`` tops)."""
    out: dict[str, tuple] = {}

    def walk(path: str, rel: str) -> None:
        with os.scandir(path) as it:
            for entry in it:
                name = f"{rel}{entry.name}"
                if not rel and entry.name in skipped:
                    continue
                st = entry.stat(follow_symlinks=False)
                out[name] = _signature(st)
                if stat.S_ISDIR(st.st_mode):
                    walk(entry.path, name + "/")

    walk(root, "")
    return out


def diff_into(root: str, before: dict[str, tuple], upper: str,
              skipped: tuple[str, ...] = SKIPPED, ignored: tuple[str, ...] = ()) -> None:
    """What changed below ``root`` since ``before``, as an overlay upper dir at ``upper``.
    ``ignored``: paths whose changes are not the step's (files kiln put in place)."""
    after = snapshot(root, skipped)
    ignore = set(ignored)
    links: dict = {}
    made: set[str] = set()

    def parents(rel: str) -> None:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p in made:
                continue
            target = os.path.join(upper, p)
            if not os.path.isdir(target):
                os.mkdir(target, 0o700)
            made.add(p)

    changed = [rel for rel, sig in after.items()
               if rel not in ignore and before.get(rel) != sig]
    # a directory made where something was removed in the step (another inode, or not a
    # directory before) hides all below it: overlayfs makes it opaque, and so does this
    opaque = {rel for rel in changed if stat.S_ISDIR(after[rel][1]) and rel in before
              and (not stat.S_ISDIR(before[rel][1]) or before[rel][0] != after[rel][0])}
    prefix = overlay_xattr_prefix()
    for rel in sorted(changed):
        src = os.path.join(root, rel)
        st = os.lstat(src)
        parents(rel)
        dst = os.path.join(upper, rel)
        if stat.S_ISDIR(st.st_mode):
            if rel not in made:
                os.mkdir(dst, 0o700)
                made.add(rel)
            if rel in opaque:
                os.setxattr(dst, prefix + "opaque", b"y", follow_symlinks=False)
        else:
            _copy_entry(st, src, dst, links)
    gone = sorted(rel for rel in before if rel not in after and rel not in ignore)
    # no whiteout below a removed directory (its own says it all), an opaque one, or what
    # is no directory any more
    covering = [*opaque, *(rel for rel in before if rel in after
                           and stat.S_ISDIR(before[rel][1])
                           and not stat.S_ISDIR(after[rel][1]))]
    for rel in gone:
        if any(rel.startswith(d + "/") for d in covering):
            continue
        if stat.S_ISDIR(before[rel][1]):
            covering.append(rel)
        parents(rel)
        try:
            os.mknod(os.path.join(upper, rel), stat.S_IFCHR | 0o600, 0)
        except OSError as e:
            raise ChrootError(f"cannot record the removal of /{rel}: {e.strerror} (overlay "
                              "whiteouts need a store on a real filesystem, such as a "
                              "volume, not the container's own overlay root)") from None
    # directories last, deepest first: their metadata (and mtimes) as the step left them
    for rel in sorted(made, key=lambda r: r.count("/"), reverse=True):
        _copy_meta(os.lstat(os.path.join(root, rel)), os.path.join(root, rel),
                   os.path.join(upper, rel))


# ---------------------------------------------------------------- a RUN step
def _make_devices(dev: str) -> None:
    """/dev/null and friends as nodes where kiln may make and open them; else (no CAP_MKNOD,
    or a store on a nodev mount) /dev/null is a plain file, since `> /dev/null` is in most
    Containerfiles, and the other nodes are missing. /dev is not part of any layer."""
    why = None
    for name, major, minor in _DEVICES:
        path = os.path.join(dev, name)
        if os.path.lexists(path):
            continue
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
            os.chmod(path, 0o666)  # whatever the umask
            if name == "null":  # the first: whether nodes here can be opened at all
                os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except PermissionError:
            if os.path.lexists(path):  # made, but not to be opened
                os.unlink(path)
                why = why or ("the store's filesystem is mounted nodev: device nodes on "
                              "it cannot be opened")
            else:
                why = why or ("no CAP_MKNOD (podman's default drops it; Docker's and "
                              "Kubernetes' keep it)")
            if name == "null":
                open(path, "wb").close()
                os.chmod(path, 0o666)
                break  # the others would fail alike
    if why:
        _warn_once(f"--isolation chroot: {why}; /dev/null in RUN steps is a plain file and "
                   "the other device nodes are missing")


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        import sys

        _warned.add(message)
        sys.stderr.write(f"kiln: warning: {message}\n")


def _can(cap: int) -> bool:
    from runtime import syscalls as sc

    return bool(sc.capget()[0] & (1 << cap))


class ChrootContainer(Container):
    """A RUN step chroot()ed into a materialized tree; ``commit()`` leaves its changes in
    spec.upper. No namespaces: it shares kiln's network, PID space and cgroup."""

    def __init__(self, spec: ContainerSpec):
        super().__init__(spec, None)
        self._before: dict[str, tuple] | None = None
        self._ignored: list[str] = []

    def _prepare(self) -> None:
        spec = self.spec
        if spec.binds or spec.tmpfs:
            raise ContainerStartError("RUN --mount needs mount namespaces, which "
                                      "--isolation chroot does without")
        if spec.network == "none":
            _warn_once("--network none is not kept under --isolation chroot: RUN steps "
                       "share kiln's network")
        root = spec.rootfs
        materialize(spec.layers, root)
        dev = os.path.join(root, "dev")
        if not os.path.isdir(dev):
            os.makedirs(dev, 0o755, exist_ok=True)
        _make_devices(dev)
        for target, source in spec.etc_files.items():
            rel = target.lstrip("/")
            path = os.path.join(root, rel)
            if not os.path.isdir(os.path.dirname(path)):
                continue
            _remove(path)
            with open(source, "rb") as src, open(path, "wb") as dst:
                dst.write(src.read())
            self._ignored.append(rel)
        self._before = snapshot(root)

    def _start(self, on_pid) -> None:
        self._prepare()
        err_read, err_write = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(err_read)
            self._child(err_write)
        os.close(err_write)
        self.pid = pid
        if on_pid is not None:
            on_pid(pid)
        self._raise_start_error(err_read)

    def _child(self, errpipe: int) -> None:
        import signal as _signal

        from runtime import process as p
        from runtime import syscalls as sc

        spec = self.spec
        try:
            sc.prctl(sc.PR_SET_PDEATHSIG, _signal.SIGKILL)
            for sig in p.FORWARDED:
                _signal.signal(sig, _signal.SIG_DFL)
            _signal.pthread_sigmask(_signal.SIG_SETMASK, set())
            os.setsid()
            for fd, target in ((spec.process.stdout, 1), (spec.process.stderr, 2)):
                if fd is not None:
                    os.dup2(fd, target)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.chroot(spec.rootfs)
            os.chdir("/")
            cwd = spec.process.cwd or "/"
            if not os.path.isdir(cwd):
                os.makedirs(cwd, 0o755, exist_ok=True)
            user = p.resolve_user(spec.process.user)
            keep = p._drop_bounding_set(spec) if _can(8) else sc.capget()[1]  # CAP_SETPCAP
            if not _can(21):  # no CAP_SYS_ADMIN: seccomp only with no_new_privs
                spec.no_new_privileges = True
            p._apply_identity_and_privileges(spec, user, keep)
            os.chdir(cwd)
            program = p._find_executable(spec.process.args[0], spec.process.env)
            sc.close_range(3, 0xFFFFFFFF, 4)
            p._exec(program, spec, errpipe, None)
        except ContainerStartError as e:
            p._fail_child(errpipe, str(e), e.exit_code)
        except BaseException as e:  # noqa: BLE001 - never a traceback into the step's output
            p._fail_child(errpipe, f"cannot start the step: {e}", 125)

    def commit(self) -> None:
        """The step's changes into spec.upper; the materialized tree is removed."""
        import shutil

        if self._before is None:
            return
        try:
            diff_into(self.spec.rootfs, self._before, self.spec.upper,
                      ignored=tuple(self._ignored))
        finally:
            shutil.rmtree(self.spec.rootfs, ignore_errors=True)
            self._before = None


def with_trees(views, fn, scratch: str):
    """runtime.workspace.with_views without mounts: each view a materialized tree, the
    changes to a view with an upper dir written there afterwards (in the calling process,
    which is root in its container: copies keep their owners)."""
    import shutil
    import tempfile

    bases, points, befores = [], [], []
    try:
        for i, view in enumerate(views):
            base = tempfile.mkdtemp(dir=scratch, prefix=f"tree{i}-")
            bases.append(base)
            point = os.path.join(base, "root")
            materialize(view.layers, point)
            points.append(point)
            befores.append(snapshot(point) if view.upper else None)
        result = fn(*points)
        for view, point, before in zip(views, points, befores, strict=True):
            if view.upper:
                os.makedirs(view.upper, exist_ok=True)
                diff_into(point, before, view.upper)
        return result
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ChrootError(f"no space left for the build's trees in {scratch}") from None
        raise
    finally:
        for base in bases:
            shutil.rmtree(base, ignore_errors=True)
