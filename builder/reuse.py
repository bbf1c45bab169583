"""A COPY from the build context that missed the cache writes only the files that changed.

A source tree where one file was edited gives COPY a new cache key, yet the step's earlier
result (same parent, same instruction, same WORKDIR: the same *lineage*) already holds all
the other files byte for byte. Writing each of them again is most of a one-file rebuild
(thousands of file creations); instead, the copy leaves them out and they are hardlinked
from the earlier layer into the new one once the workspace is gone. Layer dirs are never
written after they are made, so two of them may share inodes (the layer writer makes tar
hardlinks only between names within one layer, whatever st_nlink says).

A file is taken from the earlier layer only when everything the copy would give it is
already so there: the content (the context's digest of the source now equals the one the
earlier copy recorded for that path), size, mode, owner, mtime and extended attributes; the
source has no other names (hardlink groups are copied); nothing of the image is at its path;
and no other action of the copy has that destination, one below it, or a non-directory
above it. Anything else is copied as usual. ``--no-cache`` copies everything.

The record of a lineage (``cache/reuse/<key>.json``: the layer's diff_id and each copied
file's path and content digest) is a hint, never a prune root; the step's own cache record
keeps that layer, and ``kiln prune --build-cache`` drops both.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import stat
from dataclasses import dataclass, field

from builder import cache
from store.errors import DigestError
from store.fsutil import atomic_write, is_overlay_xattr

RECORD_FORMAT = 1
MAX_RECORD = 128 << 20  # as store.gc reads cache records
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def lineage_key(parent: str, instruction: str, workdir: str) -> str:
    """What a COPY's earlier results share with it: its key without the sources' content."""
    return cache.step_key(parent, instruction, extra={"workdir": workdir, "reuse": 1})


def _path(store, key: str) -> str:
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(f"bad lineage key {key!r}")
    return os.path.join(store.cache_dir, "reuse", key + ".json")


def load(store, key: str) -> tuple[str, dict[str, str]] | None:
    """The earlier layer's dir and its copied files (path in the image, without the leading
    '/' -> content digest), if the record is sound and the layer still in the store."""
    try:
        with open(_path(store, key), "rb") as f:
            rec = json.loads(f.read(MAX_RECORD))
        diff_id, files = rec["diff_id"], rec["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if rec.get("format") != RECORD_FORMAT or not isinstance(diff_id, str) \
            or not isinstance(files, dict):
        return None
    try:
        if not store.has_layer_dir(diff_id):
            return None
    except DigestError:
        return None
    return str(store.layer_dir(diff_id)), files


def save(store, key: str, diff_id: str, files: dict[str, str]) -> None:
    path = _path(store, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rec = {"format": RECORD_FORMAT, "diff_id": diff_id, "files": files}
    atomic_write(path, json.dumps(rec, separators=(",", ":")).encode(), tmp_dir=store.tmp,
                 durable=False)


@dataclass
class FileReuse:
    """One COPY's reuse: built in the build process, filled in by ``apply_copy`` in the
    workspace process (which sends it back), then ``link_into`` the new layer's dir."""

    digests: dict[str, str]  # context path -> content digest now
    earlier_dir: str | None = None
    earlier: dict[str, str] = field(default_factory=dict)  # image path -> digest
    upper: str = ""  # the new layer's dir (the overlay's upperdir)
    written: dict[str, str] = field(default_factory=dict)  # image path -> digest: the record
    # image path -> (source path, mode, uid, gid, mtime or None): left for link_into
    deferred: dict[str, tuple[str, int, int, int, int | None]] = field(default_factory=dict)
    stamps: dict[str, str] = field(default_factory=dict)  # image dir -> source dir (its times)
    _safe: set[str] = field(default_factory=set)
    _in_upper: set[str] = field(default_factory=set)
    _earlier_fds: dict[str, int] = field(default_factory=dict)

    def plan(self, actions) -> None:
        """Which destinations no other action of the copy can interfere with."""
        if not self.earlier:
            return
        count: dict[str, int] = {}
        ancestors: set[str] = set()
        not_dirs: set[str] = set()
        for a in actions:
            dest = posixpath.normpath(a.dest)
            count[dest] = count.get(dest, 0) + 1
            if a.kind != "dir" or a.unpack_to is not None:
                not_dirs.add(dest)
            parent = posixpath.dirname(dest)
            while parent not in ancestors and parent != "/":
                ancestors.add(parent)
                parent = posixpath.dirname(parent)
        for a in actions:
            dest = posixpath.normpath(a.dest)
            if a.kind != "file" or a.at_dest or a.unpack_to is not None or count[dest] != 1 \
                    or dest in ancestors:
                continue
            parent = posixpath.dirname(dest)
            while parent != "/" and parent not in not_dirs:
                parent = posixpath.dirname(parent)
            if parent == "/":
                self._safe.add(dest)

    def offer(self, a, src: str, root: str, target: str, mode: int, owner, mtime: int | None
              ) -> int | None:
        """Defer the file of action ``a`` (to ``target`` in the merged view ``root``) if the
        earlier layer has it exactly as the copy would make it: returns its size, else None
        (the caller copies it)."""
        rel = os.path.relpath(target, root)
        digest = self.digests.get(a.src)
        if digest is None or self.earlier.get(rel) != digest \
                or posixpath.normpath(a.dest) not in self._safe:
            return None
        if os.path.lexists(target):
            return None  # the image has something there: the copy replaces it
        parent, name = os.path.split(rel)
        try:
            st = os.lstat(src)
            # walked by fd, symlinks refused: only a file the earlier copy made is compared
            old_dir = f"/proc/self/fd/{_dir_fd(self.earlier_dir, parent, self._earlier_fds)}"
            old = os.lstat(name, dir_fd=self._earlier_fds[parent])
        except OSError:
            return None
        uid, gid = owner(st)
        mtime_ns = st.st_mtime_ns if mtime is None else mtime * 10**9
        if not (stat.S_ISREG(st.st_mode) and stat.S_ISREG(old.st_mode) and st.st_nlink == 1
                and old.st_size == st.st_size and stat.S_IMODE(old.st_mode) == mode
                and (old.st_uid, old.st_gid) == (uid, gid) and old.st_mtime_ns == mtime_ns
                and _xattrs(src) == _xattrs(os.path.join(old_dir, name))):
            return None
        if parent not in self._in_upper:
            if not os.path.isdir(os.path.join(self.upper, parent)):
                # overlayfs copies a directory up when its attributes are set: it is in the
                # new layer as it would be had the file been written into it
                host = os.path.dirname(target)
                pst = os.lstat(host)
                os.utime(host, ns=(pst.st_atime_ns, pst.st_mtime_ns), follow_symlinks=False)
            self._in_upper.add(parent)
        self.deferred[rel] = (src, mode, uid, gid, mtime)
        self.written[rel] = digest
        return st.st_size

    def copied(self) -> None:
        """The copy is over: the earlier layer's directories are closed."""
        for fd in self._earlier_fds.values():
            os.close(fd)
        self._earlier_fds.clear()

    def wrote(self, root: str, target: str, src: str | None, kind: str) -> None:
        """The copy put something at ``target``: it replaces whatever was deferred there."""
        rel = os.path.relpath(target, root)
        self.deferred.pop(rel, None)
        digest = self.digests.get(src) if kind == "file" and src is not None else None
        if digest is not None:
            self.written[rel] = digest
        else:
            self.written.pop(rel, None)

    def link_into(self) -> None:
        """Hardlink the deferred files from the earlier layer into ``upper`` (the workspace
        is gone), copying any the earlier layer no longer has, then give the directories
        they went into their source's times again. Every path is walked by fd, symlinks
        refused, so nothing lands outside ``upper``."""
        if not self.deferred:
            return
        from builder.copy import _copy_file
        from builder.sources import CopyError

        upper_fds: dict[str, int] = {}
        earlier_fds: dict[str, int] = {}
        try:
            for rel in sorted(self.deferred):
                src, mode, uid, gid, mtime = self.deferred[rel]
                parent, name = os.path.split(rel)
                try:
                    dst_fd = _dir_fd(self.upper, parent, upper_fds)
                except OSError as e:
                    raise CopyError(f"linking /{rel}: its directory in the new layer: "
                                    f"{e.strerror}") from None
                try:
                    os.link(name, name, src_dir_fd=_dir_fd(self.earlier_dir, parent, earlier_fds),
                            dst_dir_fd=dst_fd, follow_symlinks=False)
                except OSError as e:
                    # the earlier layer pruned meanwhile, or its inode at the link limit
                    if e.errno not in (errno.ENOENT, errno.EMLINK):
                        raise CopyError(f"linking /{rel} from the step's earlier layer: "
                                        f"{e.strerror}") from None
                    _copy_file(src, f"/proc/self/fd/{dst_fd}/{name}", mode, (uid, gid), mtime)
            for parent in {os.path.dirname(rel) for rel in self.deferred}:
                src_dir = self.stamps.get(parent)
                if src_dir is not None:
                    st = os.lstat(src_dir)
                    os.utime(upper_fds[parent], ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            for fd in (*upper_fds.values(), *earlier_fds.values()):
                os.close(fd)


def _dir_fd(root: str, rel: str, fds: dict[str, int]) -> int:
    """An fd of the directory ``rel`` below ``root``, every component opened O_NOFOLLOW
    from its parent's fd (a symlink on the way fails with ELOOP or ENOTDIR)."""
    fd = fds.get(rel)
    if fd is not None:
        return fd
    if not rel:
        fd = os.open(root, _DIR_FLAGS)
    else:
        parent, name = os.path.split(rel)
        fd = os.open(name, _DIR_FLAGS, dir_fd=_dir_fd(root, parent, fds))
    fds[rel] = fd
    return fd


def _xattrs(path: str) -> list[tuple[str, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise
    return sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names
                  if not n.startswith("trusted.") and not is_overlay_xattr(n))

