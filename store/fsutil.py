"""Atomic file writes and tree removal, shared by the store, its exporters and the runtime.

``write_all`` and ``replace_file`` need nothing but ``os``: they are on ``kiln run``'s
start-up path, so this module imports tempfile, shutil and pathlib only where used.
"""

from __future__ import annotations

import os
import stat


def is_host_root() -> bool:
    """Root on the host: not rootless kiln, which is uid 0 in the user's namespace
    (runtime.rootless sets KILN_ROOTLESS_UID there)."""
    return os.geteuid() == 0 and not os.environ.get("KILN_ROOTLESS_UID")


def overlay_xattr_prefix() -> str:
    """Where overlayfs keeps its own xattrs (opaque dirs, ...) in the layers kiln writes.

    trusted.overlay.* as root on the host; user.overlay.* in a user namespace (rootless
    kiln, where the overlay is mounted with ``userxattr``: trusted.* needs the host's
    CAP_SYS_ADMIN) and under --isolation chroot (kiln in a container without it).
    """
    if is_host_root() and os.environ.get("KILN_ISOLATION") != "chroot":
        return "trusted.overlay."
    return "user.overlay."


def is_overlay_xattr(name: str) -> bool:
    """overlayfs' own attribute (of either namespace): never copied, never put in a layer."""
    return name.startswith(("trusted.overlay.", "user.overlay."))


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def replace_file(path: str, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` at once (a temp file beside it, then a rename), without fsync: for
    small state and caches that mean nothing after a reboot. Raises OSError; nothing is
    left behind on failure."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask
            write_all(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write(path: str | os.PathLike, data: bytes, *, tmp_dir: str | os.PathLike | None = None,
                 mode: int = 0o644, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a mix.

    ``durable=False`` skips the fsyncs: for state that means nothing after a reboot
    (a running container's pid), where a flush would only slow the hot path.
    """
    import tempfile
    from pathlib import Path

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or path.parent, prefix=".tmp-" + path.name + "-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if durable:
                os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a tree even where layer contents made directories read-only to us."""
    import shutil

    path = os.fspath(path)

    def onerror(func, p, exc_info):
        exc = exc_info[1]
        if isinstance(exc, FileNotFoundError):
            return
        parent = os.path.dirname(p)
        try:
            st = os.lstat(parent)
            os.chmod(parent, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
        except OSError:
            raise exc from None
        func(p)

    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=onerror)
        else:
            os.unlink(path)


class new_file_in_place:  # noqa: N801 - used as a function: with new_file_in_place(p) as f
    """A user's output file (an archive), written beside ``path`` and renamed onto it when
    the block ends well, removed when it does not; its mode is what the umask gives any
    new file, not mkstemp's 0600."""

    def __init__(self, path: str | os.PathLike):
        self.target = os.path.abspath(path)

    def __enter__(self):
        import tempfile

        fd, self.tmp = tempfile.mkstemp(dir=os.path.dirname(self.target),
                                        prefix=f".{os.path.basename(self.target)}.")
        os.fchmod(fd, 0o666 & ~current_umask())
        self.file = os.fdopen(fd, "wb")
        return self.file

    def __exit__(self, kind, value, tb) -> None:
        try:
            self.file.close()
            if kind is None:
                os.rename(self.tmp, self.target)
        finally:
            if kind is not None or os.path.lexists(self.tmp):
                remove_tree(self.tmp)


def current_umask() -> int:
    """The process umask, read without the set-and-restore race of os.umask()."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


MAX_SYMLINKS = 40  # as the kernel's


def walk_path(path: str, link_target, *, too_many=None) -> list[str]:
    """The components of ``path`` with symlinks followed as if '/' were the root.

    ``link_target(rel)`` gives the target of the symlink at ``rel`` (components joined by
    '/'), or None when ``rel`` is no symlink (or missing). After MAX_SYMLINKS links,
    ``too_many`` is raised, or with None the walk stops following and takes names as they are.
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        target = link_target("/".join([*resolved, part])) if links < MAX_SYMLINKS or \
            too_many is not None else None
        if target is not None:
            links += 1
            if links > MAX_SYMLINKS:
                raise too_many
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return resolved
