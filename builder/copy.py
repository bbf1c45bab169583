"""COPY/ADD: which source files go where (Docker's rules), and writing them into a rootfs.

``plan_copy`` works on plain relative paths and kinds, so it is testable on
its own; ``apply_copy`` runs inside the build workspace (a forked child with
the image's merged filesystem mounted), resolving the destination's symlinks
inside that root, never outside.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import shutil
import stat
from dataclasses import dataclass

from store.errors import KilnError


class CopyError(KilnError):
    pass


@dataclass(frozen=True)
class SourceEntry:
    path: str  # relative to the source root, '/'-separated
    kind: str  # file | dir | symlink
    mode: int  # permission bits (incl. setuid/setgid/sticky)
    link_target: str | None = None


@dataclass(frozen=True)
class CopyAction:
    src: str | None  # relative to the source root; None for a directory made by the copy
    dest: str  # absolute path in the image
    kind: str
    mode: int
    link_target: str | None = None


def _clean(path: str) -> str:
    cleaned = posixpath.normpath("/" + path).lstrip("/")
    return "" if cleaned == "." else cleaned


def _matches(pattern: str, path: str) -> bool:
    pp, parts = pattern.split("/"), path.split("/")
    return len(pp) == len(parts) and all(fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pp,
                                                                                    strict=True))


def plan_copy(sources: list[str], dest: str, entries: list[SourceEntry], *, workdir: str = "/",
              chmod: int | None = None) -> list[CopyAction]:
    """Docker's COPY rules: directory sources copy their contents, a trailing '/' or several
    sources make ``dest`` a directory, globs match within one path level each."""
    if not dest.startswith("/"):
        dest = posixpath.join(workdir or "/", dest)
    dest_is_dir = dest.endswith("/") or dest.endswith("/.")
    dest = posixpath.normpath(dest)
    by_path = {e.path: e for e in entries}
    children: dict[str, list[SourceEntry]] = {}
    for e in entries:
        children.setdefault(posixpath.dirname(e.path), []).append(e)
    matched: list[tuple[str, SourceEntry | None]] = []
    for src in sources:
        pattern = _clean(src)
        if pattern in ("", "."):
            matched.append(("", None))  # the whole source root
            continue
        if any(c in pattern for c in "*?["):
            hits = [e for e in entries if _matches(pattern, e.path)]
            if not hits:
                raise CopyError(f"no source files were specified: {src!r} matches nothing")
            matched += [(h.path, h) for h in sorted(hits, key=lambda h: h.path)]
        elif pattern in by_path:
            matched.append((pattern, by_path[pattern]))
        else:
            raise CopyError(f"{src}: no such file or directory in the build context")
    several = len(matched) > 1
    if several and not dest_is_dir:
        raise CopyError("when using COPY with more than one source file, the destination "
                        f"must be a directory and end with a / (got {dest!r})")
    actions: list[CopyAction] = []
    for path, entry in matched:
        if entry is None or entry.kind == "dir":
            # the directory's contents, not the directory itself
            if entry is not None:
                actions.append(CopyAction(None, dest, "dir", chmod or entry.mode))
            prefix = path + "/" if path else ""
            for e in sorted(entries, key=lambda e: e.path):
                if path and not e.path.startswith(prefix):
                    continue
                rel = e.path[len(prefix):]
                actions.append(CopyAction(e.path, posixpath.join(dest, rel), e.kind,
                                          _mode(e, chmod), e.link_target))
        else:
            target = posixpath.join(dest, posixpath.basename(path)) if (
                dest_is_dir or several) else dest
            actions.append(CopyAction(entry.path, target, entry.kind, _mode(entry, chmod),
                                      entry.link_target))
    return actions


def _mode(entry: SourceEntry, chmod: int | None) -> int:
    if chmod is None or entry.kind == "symlink":
        return entry.mode
    return chmod


def resolve_dest(root: str, path: str) -> str:
    from runtime.rootfs import resolve_in_root

    return resolve_in_root(root, path)


def apply_copy(root: str, source_root: str, actions: list[CopyAction], *, uid: int = 0,
               gid: int = 0, mtime: int | None = None) -> int:
    """Write ``actions`` into ``root`` (the merged view); returns bytes copied.

    Parent directories the image lacks are made 0755 root:root; every copied
    entry gets ``uid:gid``. Destination symlinks resolve inside ``root``.
    """
    copied = 0
    for a in actions:
        parent = resolve_dest(root, posixpath.dirname(a.dest) or "/")
        _makedirs(root, parent)
        target = os.path.join(parent, posixpath.basename(a.dest)) if a.dest != "/" else root
        if a.kind == "dir":
            if os.path.islink(target) or (os.path.exists(target) and not os.path.isdir(target)):
                os.unlink(target)
            if not os.path.isdir(target):
                os.mkdir(target)
            os.chmod(target, stat.S_IMODE(a.mode))
            os.chown(target, uid, gid, follow_symlinks=False)
            continue
        if os.path.isdir(target) and not os.path.islink(target):
            # an existing directory at the destination: the file goes into it
            target = os.path.join(target, posixpath.basename(a.src or a.dest))
        if os.path.lexists(target) and not os.path.isdir(target):
            os.unlink(target)
        src = os.path.join(source_root, a.src) if a.src else None
        if a.kind == "symlink":
            os.symlink(a.link_target or "", target)
            os.chown(target, uid, gid, follow_symlinks=False)
            continue
        assert src is not None
        with open(src, "rb") as fin, open(target, "xb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            copied += fout.tell()
        os.chown(target, uid, gid)
        os.chmod(target, stat.S_IMODE(a.mode))
        st = os.stat(src)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns) if mtime is None else
                 (mtime * 10**9, mtime * 10**9))
    return copied


def _makedirs(root: str, path: str) -> None:
    rel = os.path.relpath(path, root)
    current = root
    if rel == ".":
        return
    for part in rel.split(os.sep):
        current = os.path.join(current, part)
        if os.path.islink(current):
            current = resolve_dest(root, "/" + os.path.relpath(current, root))
            continue
        if not os.path.exists(current):
            os.mkdir(current, 0o755)
            os.chown(current, 0, 0)
        elif not os.path.isdir(current):
            raise CopyError(f"cannot copy: /{os.path.relpath(current, root)} in the image is "
                            "not a directory")


def source_entries_from_tree(root: str) -> list[SourceEntry]:
    """Entries of a directory tree (another stage's rootfs, an extracted archive)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if stat.S_ISLNK(st.st_mode):
                out.append(SourceEntry(rel, "symlink", 0o777, os.readlink(full)))
            elif stat.S_ISDIR(st.st_mode):
                out.append(SourceEntry(rel, "dir", stat.S_IMODE(st.st_mode)))
            elif stat.S_ISREG(st.st_mode):
                out.append(SourceEntry(rel, "file", stat.S_IMODE(st.st_mode)))
    return out
