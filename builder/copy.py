"""COPY/ADD: which source files go where (Docker's rules), and writing them into a rootfs.

``plan_copy`` works on plain relative paths and kinds, so it is testable on
its own; ``apply_copy`` runs inside the build workspace (a forked child with
the image's merged filesystem mounted), resolving the destination's symlinks
inside that root, never outside.

Symlinks, as BuildKit's COPY (fsutil's copy with FollowLinks): a source path's own symlinks
(its last component and its parents) are followed inside the source root, and the file or
directory they lead to is copied under the name the source was given; symlinks inside a
copied directory stay symlinks. The destination as written has its symlinks followed inside
the image (fs.RootPath). Below it, a directory merges into a directory and a file or symlink
replaces a file or symlink, but neither replaces the other kind: BuildKit refuses that
("cannot replace to directory", "cannot copy to non-directory"; moby/buildkit#2626), where
the classic builder and buildah replace (moby/moby#41035 calls that a bug: a usrmerged /bin
symlink became a directory).

ADD's local archives (tar, plain or gzip/bzip2/xz/zstd compressed) are extracted here too,
with docker's semantics rather than a layer's: ``.wh.`` names are ordinary files, entries
merge into what the image has, and every path stays inside the destination directory.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from builder import globs
from builder.chmod import Chmod
from builder.sources import (
    CopyError,
    SourceEntry,
    follow,
    missing_through_links,
)
from store.compression import (
    IN_CHUNK,
    OUT_CHUNK,
    ChunkReader,
    CountingReader,
    ExpansionBudget,
    ExpansionError,
    StreamError,
    decompressed_chunks,
    within_budget,
)
from store.fsutil import current_umask, is_overlay_xattr, write_all

if TYPE_CHECKING:
    import tarfile

    from builder.reuse import FileReuse
    from store.layer_extract import ExtractLimits


@dataclass(frozen=True)
class CopyAction:
    src: str | None  # relative to the source root ('' the root); None: a directory made here
    dest: str  # absolute path in the image
    kind: str
    mode: int
    link_target: str | None = None
    unpack_to: str | None = None  # ADD: extract here instead if the file is a tar archive
    # the destination as the user wrote it: its symlinks are followed (BuildKit resolves it
    # in the image), a file goes into a directory found there, and a directory found there
    # keeps its owner and mode. Else the action is an entry below it, which replaces what
    # is in its way.
    at_dest: bool = True
    name: str | None = None  # the source's name as given (a followed symlink's, not its target's)
    # which source (BuildKit: which copy) the action comes from: files hardlinked to each
    # other in one source stay hardlinked, as fsutil's copier keeps them; never across two
    group: int = 0


def _clean(path: str) -> str:
    cleaned = posixpath.normpath("/" + path).lstrip("/")
    return "" if cleaned == "." else cleaned


def plan_copy(sources: list[str], dest: str, entries: list[SourceEntry], *, workdir: str = "/",
              chmod: Chmod | int | None = None, parents: bool = False,
              exclude: list[str] | None = None,
              unpack: bool = False, force_dir: bool = False,
              source_name: str = "the build context",
              follow_links: bool | None = None) -> list[CopyAction]:
    """Docker's COPY rules: directory sources copy their contents, a trailing '/' or several
    sources (``force_dir``: counted by the caller across source kinds) make ``dest`` a
    directory, globs match within one path level each (builder.globs).

    ``follow_links`` (default: not ``parents``, as BuildKit, whose --parents copies what its
    patterns match as it is) follows each source's symlinks inside the source root: the
    entries must hold the symlinks on the way and what they lead to. ``parents`` (BuildKit's
    --parents) keeps each match's path below the context root, or below a ``/./`` pivot in
    the source; its sources are include patterns, where ``**`` spans directories.
    ``exclude`` patterns (.dockerignore syntax) drop entries, matched against the
    path below the source directory (with ``parents``: below the pivot), and a glob's own
    matches against their path below the glob's fixed part.
    ``unpack`` (ADD) marks file sources to be extracted into ``dest`` if they are archives.
    ``source_name`` says where a missing source was looked for ("stage build").
    ``chmod`` (builder.chmod) gives each entry its mode; an int is an octal one.
    """
    if isinstance(chmod, int):
        chmod = Chmod(f"{chmod:o}", octal=chmod)
    if follow_links is None:
        follow_links = not parents
    if not dest.startswith("/"):
        dest = posixpath.join(workdir or "/", dest)
    dest_is_dir = dest.endswith("/") or dest.endswith("/.") or force_dir or parents
    dest = posixpath.normpath(dest)
    by_path = {e.path: e for e in entries}
    excluded = _exclusion(exclude)
    def link_target(rel: str) -> str | None:
        e = by_path.get(rel)
        return e.link_target if e is not None and e.kind == "symlink" else None

    def followed(src: str, rel: str) -> tuple[str, SourceEntry | None]:
        if not follow_links:
            return rel, by_path[rel]
        f = follow(rel, link_target)
        entry = by_path.get(f.path)
        if f.path and entry is None:
            raise CopyError(missing_through_links(src, f, source_name) if f.links else
                            f"{src}: no such file or directory in {source_name}")
        return f.path, entry

    # (path whose entries are copied, its entry, base it hangs from, the name it is copied as,
    # the copy it is part of: BuildKit copies each match of a source on its own, but all that
    # one --parents source matches in one copy)
    matched: list[tuple[str, SourceEntry | None, str, str, int]] = []
    kind = _kinds(by_path)
    for index, src in enumerate(sources):
        try:
            if parents:
                found = globs.match_parents(src, by_path, kind)
                if globs.has_wildcards(src):
                    found = [(p, pivot) for p, pivot in found if not excluded(_below(p, pivot))]
                # a whole pivot (``dir/./``) brings its contents, as the root does
                matched += [(p, by_path.get(p) if p != pivot else None, pivot,
                             posixpath.basename(p), index) for p, pivot in found]
                continue
            pattern = _clean(src)
            glob_base = globs.split_wildcards(pattern)[0]
            if follow_links and glob_base and glob_base != pattern:
                # the fixed part's symlinks lead to where the wildcard is matched
                resolved = follow(glob_base, link_target).path
                pattern = posixpath.join(resolved, pattern[len(glob_base):].lstrip("/"))
                glob_base = resolved
            hits = globs.match_wildcards(pattern, by_path, kind)
        except globs.GlobError as e:
            raise CopyError(f"{src}: {e}") from None
        except globs.SourceMissing as e:
            raise CopyError(f"{e.path}: no such file or directory in {source_name}") from None
        if hits is not None:
            for p in hits:
                if excluded(_below(p, glob_base)):
                    continue
                entry = by_path[p]
                if follow_links and entry.kind == "symlink":
                    matched.append((*followed(src, p), "", posixpath.basename(p), -1))
                else:
                    matched.append((p, entry, "", posixpath.basename(p), -1))
        elif pattern == "":
            matched.append(("", None, "", "", -1))  # the whole source root
        elif pattern in by_path or follow_links:
            matched.append((*followed(src, pattern), "", posixpath.basename(pattern), -1))
        else:
            raise CopyError(f"{src}: no such file or directory in {source_name}")
    several = len(matched) > 1
    if several and not dest_is_dir:
        raise CopyError("when using COPY with more than one source file, the destination "
                        f"must be a directory and end with a / (got {dest!r})")
    actions: list[CopyAction] = []
    made: set[str] = set()
    for i, (path, entry, base, name, group) in enumerate(matched):
        group = i if group < 0 else group
        if parents:
            actions += _parent_dirs(path, base, dest, by_path, made)
            target = posixpath.join(dest, _below(path, base)) if path != base else dest
        else:
            target = dest
        if entry is None or entry.kind == "dir":
            # the directory's contents (with --parents: the directory itself, then them)
            if parents:
                if entry is not None:
                    actions.append(CopyAction(path, target, "dir", _mode(entry, chmod),
                                              at_dest=False, group=group))
            else:  # BuildKit: made if missing (0755 or an octal --chmod's mode, its owner
                # --chown's), else kept as it is
                actions.append(CopyAction(path, target, "dir",
                                          chmod.created_dir_mode if chmod else 0o755,
                                          group=group))
            prefix = path + "/" if path else ""
            for e in sorted(entries, key=lambda e: e.path):
                if path and not e.path.startswith(prefix):
                    continue
                rel = e.path[len(prefix):]
                if excluded(_below(e.path, base) if parents else rel):
                    continue
                actions.append(CopyAction(e.path, posixpath.join(target, rel), e.kind,
                                          _mode(e, chmod), e.link_target, at_dest=False,
                                          group=group))
        else:
            named = parents or dest_is_dir or several
            if not parents and named:
                target = posixpath.join(dest, name)
            unpack_to = dest if unpack and entry.kind == "file" and not parents else None
            actions.append(CopyAction(entry.path, target, entry.kind, _mode(entry, chmod),
                                      entry.link_target, unpack_to, at_dest=not named,
                                      name=name, group=group))
    return actions


def _exclusion(patterns: list[str] | None):
    if not patterns:
        return lambda _path: False
    from builder.ignore import IgnoreError, IgnoreMatcher

    try:
        matcher = IgnoreMatcher(patterns)
        matcher.matches("x")  # a bad pattern fails here, not halfway through a copy
    except IgnoreError as e:
        raise CopyError(f"--exclude: {e}") from None
    return lambda path: bool(path) and matcher.matches(path)


def _kinds(by_path: dict[str, SourceEntry]):
    def kind(path: str) -> str | None:
        entry = by_path.get(path)
        return entry.kind if entry is not None else None

    return kind


def _below(path: str, base: str) -> str:
    if path == base:
        return ""
    if not base:
        return path
    return path[len(base) + 1:] if path.startswith(base + "/") else path


def _parent_dirs(path: str, base: str, dest: str, by_path: dict[str, SourceEntry],
                 made: set[str]) -> list[CopyAction]:
    """--parents: the directories between ``base`` and ``path``, with their source modes."""
    out = []
    rel = _below(path, base)
    parts = rel.split("/")[:-1]
    for i in range(len(parts)):
        sub = "/".join(parts[:i + 1])
        target = posixpath.join(dest, sub)
        if target in made:
            continue
        made.add(target)
        src = by_path.get(posixpath.join(base, sub) if base else sub)
        out.append(CopyAction(src.path if src else None, target, "dir",
                              src.mode if src else 0o755, at_dest=False))
    return out


def _mode(entry: SourceEntry, chmod: Chmod | None) -> int:
    if chmod is None or entry.kind == "symlink":
        return entry.mode
    return chmod.apply(entry.mode, entry.kind == "dir")


def resolve_dest(root: str, path: str) -> str:
    from runtime.rootfs import resolve_in_root

    return resolve_in_root(root, path)


def apply_copy(root: str, source_root: str, actions: list[CopyAction], *, uid: int = 0,
               gid: int = 0, mtime: int | None = None,
               archive_owner: tuple[int, int] | None = None, keep_owner: bool = False,
               dir_mode: int = 0o755, reuse: FileReuse | None = None) -> int:
    """Write ``actions`` into ``root`` (the merged view); returns bytes copied.

    Entries are owned by ``uid:gid``, or with ``keep_owner`` (COPY --from without --chown,
    moby/moby#38599) by their owner in the source; directories the copy makes for the
    destination are ``dir_mode`` (0755, or an octal --chmod's mode) and owned by ``uid:gid``
    (0:0 unless --chown), as BuildKit's. Files hardlinked to each other within one source
    (the actions of one ``group``) are hardlinked in the copy too, as BuildKit's copier does.
    Extended attributes (user.*, security.capability...) come along, best effort as
    BuildKit's; directories get their source's times once filled. Destination symlinks
    resolve inside ``root``.
    An action with ``unpack_to`` whose source is a tar archive (plain, gzip, bzip2, xz or
    zstd) is extracted there instead, its entries owned as the archive says unless
    ``archive_owner`` (ADD --chown) is given.
    With ``reuse`` (builder.reuse), files an earlier result of the same step has exactly as
    this copy would write them are left for ``reuse.link_into`` once the workspace is gone.
    """
    w = _Writer(root, source_root, uid, gid, mtime, archive_owner, keep_owner, dir_mode,
                reuse=reuse)
    if reuse is not None:
        reuse.plan(actions)
    copied = 0
    for a in actions:
        try:
            copied += w.apply(a)
        except OSError as e:  # a full disk, a source that vanished: say which file
            what = f"copying {a.src} to {a.dest}" if a.src is not None and a.kind != "dir" \
                else f"making {a.dest}"
            raise CopyError(f"{what}: {e.strerror or e}") from None
    try:
        w.stamp_dirs()
    except OSError as e:
        raise CopyError(f"setting the times of the copied directories: {e.strerror or e}"
                        ) from None
    if reuse is not None:
        reuse.copied()
        reuse.stamps.update((os.path.relpath(host, root), src) for host, src in w.stamps)
    return copied


@dataclass
class _Writer:
    """apply_copy's state: where resolved destination directories are, which directories
    get their source's times at the end, which files of the current source are hardlinked,
    and what owner a file created in a directory gets by itself."""

    root: str
    source_root: str
    uid: int
    gid: int
    mtime: int | None
    archive_owner: tuple[int, int] | None
    keep_owner: bool
    dir_mode: int = 0o755
    reuse: FileReuse | None = None
    parents: dict[str, str] = field(default_factory=dict)  # image dir -> host dir
    stamps: list[tuple[str, str]] = field(default_factory=list)  # (host dir, source dir)
    group: int = -1
    links: dict[tuple[int, int], str] = field(default_factory=dict)  # (dev, ino) -> host path
    made_owners: dict[str, tuple[int, int]] = field(default_factory=dict)  # host dir -> owner
    # mode bits open() may not give a new file by itself (then an fchmod follows)
    chmod_mask: int = field(default_factory=lambda: 0o7000 | current_umask())
    ids: tuple[int, int] = field(default_factory=lambda: (os.geteuid(), os.getegid()))

    def apply(self, a: CopyAction) -> int:
        if a.group != self.group:  # links are kept within one source, never across two
            self.group = a.group
            self.links.clear()
        if a.unpack_to is not None and a.src is not None:
            path = os.path.join(self.source_root, a.src)
            kind = archive_kind(path)
            if kind is not None:
                copied = extract_archive(path, kind, self.root, a.unpack_to,
                                         owner=self.archive_owner, name=a.src)
                self.parents.clear()  # an archive may have put anything anywhere
                self.made_owners.clear()
                return copied
        if a.kind == "dir" and a.at_dest:
            return self._dest_dir(a)
        if a.at_dest:
            host = resolve_dest(self.root, a.dest)  # its symlinks followed, as BuildKit's
            if _is_dir(host):
                target = os.path.join(host, a.name or posixpath.basename(a.src or a.dest))
            else:
                _makedirs(self.root, os.path.dirname(host), self.uid, self.gid, self.dir_mode)
                target = host
        else:
            target = os.path.join(self._parent(a.dest), posixpath.basename(a.dest))
        src = os.path.join(self.source_root, a.src) if a.src is not None else None
        if self.reuse is not None:
            if a.kind == "file" and src is not None:
                size = self.reuse.offer(a, src, self.root, target, stat.S_IMODE(a.mode),
                                        self._owner, self.mtime)
                if size is not None:
                    return size
            self.reuse.wrote(self.root, target, a.src, a.kind)
        if a.kind == "dir":
            self._inside_dir(a, target, src)
            return 0
        if a.kind == "symlink":
            _clear(target, a)
            os.symlink(a.link_target or "", target)
            self._forget_below(a.dest)  # paths below a new symlink resolve anew
            st = os.lstat(src) if src is not None else None
            os.chown(target, *self._owner(st), follow_symlinks=False)
            if st is not None:
                _copy_xattrs(src, target)
                os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
            return 0
        assert src is not None
        # most destinations are new: _clear's checks run only when one is not
        return _copy_file(src, target, stat.S_IMODE(a.mode), self._owner, self.mtime,
                          make_room=lambda: _clear(target, a, forget=self._forget_below),
                          links=self.links, made_owner=self._made_owner,
                          chmod_mask=self.chmod_mask)

    def _owner(self, st: os.stat_result | None) -> tuple[int, int]:
        if self.keep_owner and st is not None:
            return st.st_uid, st.st_gid
        return self.uid, self.gid

    def _made_owner(self, host_dir: str) -> tuple[int, int]:
        """The owner a file created in ``host_dir`` gets without a chown: ours, with the
        directory's group if it is setgid. One stat per directory."""
        owner = self.made_owners.get(host_dir)
        if owner is None:
            st = os.stat(host_dir)
            owner = (self.ids[0], st.st_gid if st.st_mode & stat.S_ISGID else self.ids[1])
            self.made_owners[host_dir] = owner
        return owner

    def _parent(self, dest: str) -> str:
        dest_dir = posixpath.dirname(dest) or "/"
        parent = self.parents.get(dest_dir)
        if parent is None:
            parent = resolve_dest(self.root, dest_dir)
            _makedirs(self.root, parent, self.uid, self.gid, self.dir_mode)
            self.parents[dest_dir] = parent
        return parent

    def _forget_below(self, dest: str) -> None:
        stale = dest.rstrip("/")
        for key in [k for k in self.parents if k == stale or k.startswith(stale + "/")]:
            del self.parents[key]

    def _dest_dir(self, a: CopyAction) -> int:
        """The directory a directory source's contents go into: followed if a symlink; made
        0755 (or an octal --chmod's mode) if missing; else left with its owner and mode."""
        host = resolve_dest(self.root, a.dest)
        try:
            st = os.lstat(host)
        except FileNotFoundError:
            _makedirs(self.root, os.path.dirname(host), self.uid, self.gid, self.dir_mode)
            os.mkdir(host)
            os.chmod(host, stat.S_IMODE(a.mode))
            os.chown(host, self.uid, self.gid)
        else:
            if not stat.S_ISDIR(st.st_mode):
                raise CopyError(f"cannot copy a directory to {a.dest}: it is not a directory "
                                "in the image")
        self.parents[posixpath.normpath(a.dest)] = host
        if self.reuse is not None:
            self.reuse.wrote(self.root, host, None, "dir")
        if a.src is not None:
            self.stamps.append((host, os.path.join(self.source_root, a.src)))
        return 0

    def _inside_dir(self, a: CopyAction, target: str, src: str | None) -> None:
        """A directory inside a copied one: made, or merged into a directory there, which
        takes the source's mode, owner and attributes (as BuildKit's); anything else there
        fails the copy."""
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            what = "symlink" if stat.S_ISLNK(st.st_mode) else "file"
            raise CopyError(f"cannot copy the directory {a.src} to {a.dest}: {a.dest} is a "
                            f"{what} in the image (Docker refuses to replace it with a "
                            "directory too)")
        if st is None:
            os.mkdir(target)
        src_st = os.lstat(src) if src is not None else None
        os.chown(target, *self._owner(src_st), follow_symlinks=False)
        os.chmod(target, stat.S_IMODE(a.mode))
        self.made_owners.pop(target, None)  # its group and setgid bit may have changed
        if src is not None:
            _copy_xattrs(src, target)
            self.stamps.append((target, src))

    def stamp_dirs(self) -> None:
        """Directories get their source's times after their contents are in (deepest first),
        as BuildKit's copy does."""
        for host, src in reversed(self.stamps):
            st = os.lstat(src)
            os.utime(host, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _clear(target: str, a: CopyAction, *, forget: Callable[[str], None] | None = None
           ) -> str:
    """Make room at ``target`` for a file or symlink: a file or symlink there goes; a
    directory stays, and the copy fails (as BuildKit's)."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return target
    if stat.S_ISDIR(st.st_mode):
        dest = a.dest if not a.at_dest else f"{a.dest.rstrip('/')}/{os.path.basename(target)}"
        raise CopyError(f"cannot copy {a.src} to {dest}: {dest} is a directory in the image "
                        f"(Docker refuses to replace it with a {a.kind} too)")
    os.unlink(target)
    if forget is not None and not stat.S_ISREG(st.st_mode):
        forget(a.dest)  # paths below a symlink that was there resolve anew
    return target


def _copy_xattrs(src: str | int, target: str | int) -> None:
    """The extended attributes of ``src`` onto ``target`` (paths are not followed), but
    trusted.* and overlayfs' own; best effort, as BuildKit's copy."""
    follow = not isinstance(src, str)
    try:
        names = os.listxattr(src, follow_symlinks=follow)
    except OSError:
        return
    for name in names:
        if name.startswith("trusted.") or is_overlay_xattr(name):
            continue
        with contextlib.suppress(OSError):
            value = os.getxattr(src, name, follow_symlinks=follow)
            os.setxattr(target, name, value, follow_symlinks=not isinstance(target, str))


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _copy_file(src: str, target: str, mode: int,
               owner: tuple[int, int] | Callable[[os.stat_result], tuple[int, int]],
               mtime: int | None, make_room: Callable[[], str] | None = None, *,
               links: dict[tuple[int, int], str] | None = None,
               made_owner: Callable[[str], tuple[int, int]] | None = None,
               chmod_mask: int = 0o7777) -> int:
    """One file, all by descriptors: content (sendfile), owner, mode, extended attributes
    (after the owner: a chown drops file capabilities), times.

    ``owner`` is a pair, or a function of the source's stat. If ``target`` exists,
    ``make_room()`` says where the file goes instead (or clears the way) and the file is
    created there. With ``links``, a source file that has other names is hardlinked to the
    copy of the first of them seen (the map of (dev, inode) to copies is kept up to date).
    The file is created with its mode, and the chown and chmod that would change nothing are
    skipped: ``made_owner(dir)`` says what owner a new file gets there, ``chmod_mask`` which
    mode bits open() does not apply by itself (the umask's, setuid/setgid/sticky)."""
    fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fin)
        if links is not None and st.st_nlink > 1:
            first = links.get((st.st_dev, st.st_ino))
            if first is not None and _link(first, target, make_room):
                return 0
            links[(st.st_dev, st.st_ino)] = target
        try:
            fout = os.open(target, _CREATE, mode & 0o777)
        except FileExistsError:
            if make_room is None:
                raise
            target = make_room()
            fout = os.open(target, _CREATE, mode & 0o777)
        try:
            done = 0
            while done < st.st_size:
                n = os.sendfile(fout, fin, done, min(st.st_size - done, 1 << 30))
                if n == 0:
                    break  # the file shrank while being copied
                done += n
            wanted = owner(st) if callable(owner) else owner
            chowned = made_owner is None or wanted != made_owner(os.path.dirname(target))
            if chowned:
                os.fchown(fout, *wanted)
            if chowned or mode & chmod_mask:  # a chown clears setuid and setgid
                os.fchmod(fout, mode)
            _copy_xattrs(fin, fout)
            os.utime(fout, ns=(st.st_atime_ns, st.st_mtime_ns) if mtime is None else
                     (mtime * 10**9, mtime * 10**9))
        finally:
            os.close(fout)
    finally:
        os.close(fin)
    return done


def _link(first: str, target: str, make_room: Callable[[], str] | None) -> bool:
    """``target`` as another name of the copy ``first``; False if that copy is gone."""
    try:
        os.link(first, target, follow_symlinks=False)
    except FileExistsError:
        if make_room is None:
            raise
        try:
            os.link(first, make_room(), follow_symlinks=False)
        except FileNotFoundError:
            return False
    except FileNotFoundError:
        return False
    return True


def _makedirs(root: str, path: str, uid: int = 0, gid: int = 0, mode: int = 0o755) -> None:
    """Make the missing directories of ``path`` (``mode``, owned by uid:gid as COPY --chown
    wants for the directories it creates, as docker and buildah do)."""
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
            os.mkdir(current, 0o700)
            os.chown(current, uid, gid)
            os.chmod(current, mode)  # whatever the umask
        elif not os.path.isdir(current):
            raise CopyError(f"cannot copy: /{os.path.relpath(current, root)} in the image is "
                            "not a directory")


def source_entries_from_tree(root: str, under: str = "") -> list[SourceEntry]:
    """Entries of a directory tree (another stage's rootfs, an extracted archive), or of
    its subtree ``under`` (that directory included, paths still relative to ``root``)."""
    out = []
    top = os.path.join(root, under) if under else root
    if under:
        entry = _tree_entry(root, top)
        if entry is None:
            return []
        out.append(entry)
        if entry.kind != "dir":
            return out
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            entry = _tree_entry(root, os.path.join(dirpath, name))
            if entry is not None:
                out.append(entry)
    return out


def _tree_entry(root: str, full: str) -> SourceEntry | None:
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        return None
    rel = os.path.relpath(full, root).replace(os.sep, "/")
    if stat.S_ISLNK(st.st_mode):
        return SourceEntry(rel, "symlink", 0o777, os.readlink(full))
    if stat.S_ISDIR(st.st_mode):
        return SourceEntry(rel, "dir", stat.S_IMODE(st.st_mode))
    if stat.S_ISREG(st.st_mode):
        return SourceEntry(rel, "file", stat.S_IMODE(st.st_mode))
    return None


def tree_entries_for(root: str, sources: list[str]) -> list[SourceEntry]:
    """The entries of a stage's (or image's) tree that COPY ``sources`` need, their symlinks
    followed inside ``root``: each source's subtree, the symlinks on its way and what they
    lead to; a glob's fixed directory (and where its symlinks lead). Not the whole tree."""

    def link_target(rel: str) -> str | None:
        full = os.path.join(root, rel)
        return os.readlink(full) if os.path.islink(full) else None

    found: dict[str, SourceEntry] = {}
    walked: set[str] = set()

    def take(rel: str) -> None:
        f = follow(rel, link_target)
        for link, target in f.links:
            found[link] = SourceEntry(link, "symlink", 0o777, target)
        if f.path in walked or any(f.path.startswith(w + "/") or not w for w in walked):
            return
        walked.add(f.path)
        for e in source_entries_from_tree(root, f.path):
            found[e.path] = e

    for src in sources:
        pattern = _clean(src)
        if not globs.has_wildcards(pattern):
            take(pattern)
            continue
        fixed = globs.split_wildcards(pattern)[0]
        take(fixed)
        resolved = follow(fixed, link_target).path
        pattern = posixpath.join(resolved, pattern[len(fixed):].lstrip("/"))
        for e in list(found.values()):  # a symlink the glob matches is followed too
            if e.kind == "symlink" and globs.matches(pattern, e.path):
                take(e.path)
    return sorted(found.values(), key=lambda e: e.path)


# -- ADD: local archives ----------------------------------------------------------------------
_MAGICS = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
           (b"\x28\xb5\x2f\xfd", "zstd"))
_TAR_BLOCK = 512


def archive_kind(path: str) -> str | None:
    """The compression of ``path`` if it is a tar archive ADD extracts, else None.

    As docker: a regular file whose (decompressed) start is a valid tar header; a lone .gz
    that holds no tar, an empty file or an unreadable stream is copied as it is."""
    try:
        with open(path, "rb", buffering=0) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            head = f.read(8)
            kind = next((k for magic, k in _MAGICS if head.startswith(magic)), "none")
            f.seek(0)
            with contextlib.closing(_decompressed(f, kind)) as reader:
                block = reader.read(_TAR_BLOCK)
    except (OSError, CopyError, EOFError, ValueError):
        return None
    return kind if _is_tar_header(block) else None


def _is_tar_header(block: bytes) -> bool:
    if len(block) < _TAR_BLOCK or not block.strip(b"\0"):
        return False
    field = block[148:156].replace(b"\0", b" ").strip()
    try:
        want = int(field, 8)
    except ValueError:
        return False
    blanked = block[:148] + b" " * 8 + block[156:]
    unsigned = sum(blanked)
    signed = sum(b - 256 if b > 127 else b for b in blanked)
    return want in (unsigned, signed)


def _stdlib_chunks(raw: BinaryIO, new: Callable[[], object], what: str) -> Iterator[bytes]:
    """bz2/lzma output bounded per step; concatenated streams go on (NUL padding between
    them is skipped); a stream cut short is an error."""
    d = new()
    data = b""
    while True:
        if d.eof:
            data = (d.unused_data or raw.read(IN_CHUNK)).lstrip(b"\0")
            while not data:
                more = raw.read(IN_CHUNK)
                if not more:
                    return
                data = more.lstrip(b"\0")
            d = new()
        elif not data and d.needs_input:
            data = raw.read(IN_CHUNK)
            if not data:
                raise CopyError(f"{what} stream is truncated")
        out = d.decompress(data, OUT_CHUNK)
        data = b""
        if out:
            yield out


def _decompressed(raw: BinaryIO, kind: str, budget: ExpansionBudget | None = None,
                  shown: str = "") -> BinaryIO:
    import bz2  # bz2, lzma and tarfile: only for ADD archives, not on every COPY's path
    import lzma

    counted = CountingReader(raw)
    if kind == "bzip2":
        chunks = _stdlib_chunks(counted, bz2.BZ2Decompressor, "bzip2")
    elif kind == "xz":
        chunks = _stdlib_chunks(counted, lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ), "xz")
    else:
        chunks = decompressed_chunks(counted, kind)
    if budget is not None:
        chunks = _within_budget(chunks, counted, budget, shown)
    return io.BufferedReader(
        ChunkReader(chunks, error=CopyError, prefix="corrupt archive: ",
                    catch=(StreamError, OSError, EOFError, lzma.LZMAError)), OUT_CHUNK)


def _within_budget(chunks: Iterator[bytes], counted: CountingReader, budget: ExpansionBudget,
                   shown: str) -> Iterator[bytes]:
    try:
        yield from within_budget(chunks, counted, budget)
    except ExpansionError as e:  # not "corrupt archive", as ChunkReader would say
        raise CopyError(f"ADD {shown}: {e}") from None


def _clean_member(name: str) -> list[str]:
    """A member name as components below the destination; '..' that climbs out is refused
    (docker's breakout check), a leading '/' just means the destination."""
    parts: list[str] = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not parts:
                raise _Refused(f"{name!r} is outside of the destination")
            parts.pop()
        else:
            parts.append(p)
    return parts


class _Refused(Exception):
    pass


@dataclass
class _Extraction:
    root_host: str  # the destination directory (host path inside the merged view)
    owner: tuple[int, int] | None
    image_root: str = ""  # the merged view's root: where a symlink may point
    entries: int = 0
    written: int = 0
    dirs: list[tuple[str, int]] = field(default_factory=list)  # (host path, mtime) to restamp

    _fds: dict[tuple[str, ...], int] = field(default_factory=dict)

    def parent_fd(self, parts: list[str]) -> int:
        """An O_DIRECTORY fd of the member's parent, symlinks resolved as if the destination
        were '/' (docker extracts chrooted there), missing directories made 0755.

        The fd is cached (the caller must not close it) until ``changed()``: only a removal or
        a new symlink can make the same names lead elsewhere."""
        key = tuple(parts)
        fd = self._fds.get(key)
        if fd is None:
            if len(self._fds) >= _FD_CACHE:
                self.changed()
            fd = self._fds[key] = self._open_parent(parts)
        return fd

    def changed(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def reopen(self, parts: list[str]) -> int:
        """After a removal or a new symlink: forget every cached parent, open this one anew."""
        self.changed()
        return self.parent_fd(parts)

    def _open_parent(self, parts: list[str]) -> int:
        from runtime.rootfs import RootfsError, resolve_in_root

        try:
            host = resolve_in_root(self.root_host, "/".join(parts))
        except RootfsError as e:
            raise _Refused(str(e)) from None
        rel = os.path.relpath(host, self.root_host)
        fd = os.open(self.root_host, _DIR_FLAGS)
        try:
            for comp in ([] if rel == "." else rel.split(os.sep)):
                try:
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    uid, gid = self.owner or (0, 0)
                    os.chown(comp, uid, gid, dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    pass
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    raise _Refused(f"{'/'.join(parts)}: a parent is not a directory "
                                   f"({e.strerror})") from None
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd


_FD_CACHE = 256
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def extract_archive(path: str, kind: str, root: str, dest: str, *,
                    owner: tuple[int, int] | None = None, name: str = "",
                    limits: ExtractLimits | None = None) -> int:
    """Extract the tar at ``path`` into ``dest`` (an image path) of ``root``; returns bytes.

    Docker's ADD semantics: entries merge into what is there (a directory over a directory
    stays, anything else is replaced), names are confined to ``dest``, a symlink whose target
    climbs out of ``dest`` or a '..' name is refused, symlinks on the way resolve inside
    ``dest``. ``.wh.`` names are plain files here. Device nodes are skipped (a 0:0 one would
    be a whiteout in the layer).
    """
    import tarfile

    from store.layer_extract import limits_from_env  # the extractor loads only for ADD archives

    limits = limits or limits_from_env()
    dest_host = resolve_dest(root, dest)
    _makedirs(root, dest_host, *(owner or (0, 0)))
    if owner is not None and not os.path.islink(dest_host):
        os.chown(dest_host, *owner)
    x = _Extraction(dest_host, owner, root)
    shown = name or os.path.basename(path)
    member_name = ""
    try:
        with open(path, "rb") as raw, \
                contextlib.closing(_decompressed(raw, kind, limits.budget(), shown)) as reader, \
                tarfile.open(fileobj=reader, mode="r|", encoding="utf-8",
                             errors="surrogateescape") as tar:
            for member in tar:
                member_name = member.name
                x.entries += 1
                if x.entries > limits.max_entries:
                    raise _Refused(f"more than {limits.max_entries} entries")
                if len(os.fsencode(member.name)) > limits.max_path_bytes:
                    raise _Refused("name too long")
                _extract_member(tar, member, x, limits)
        x.changed()
        for host, mtime in reversed(x.dirs):
            with contextlib.suppress(FileNotFoundError):
                os.utime(host, (mtime, mtime), follow_symlinks=False)
    except CopyError:
        x.changed()
        raise
    except _Refused as e:
        x.changed()
        where = f" (entry {member_name!r})" if member_name else ""
        raise CopyError(f"ADD {shown}: refusing to extract{where}: {e}") from None
    except (tarfile.TarError, EOFError) as e:
        x.changed()
        raise CopyError(f"ADD {shown}: bad tar archive near {member_name!r}: {e}") from None
    except OSError as e:
        x.changed()
        raise CopyError(f"ADD {shown}: extracting {member_name!r}: {e}") from None
    return x.written


def _extract_member(tar: tarfile.TarFile, m: tarfile.TarInfo, x: _Extraction,
                    limits: ExtractLimits) -> None:
    parts = _clean_member(m.name)
    if not parts:
        return  # the destination itself: docker leaves it as it is
    if m.ischr() or m.isblk():
        return
    pfd = x.parent_fd(parts[:-1])  # cached by x: not closed here
    name = parts[-1]
    try:
        uid, gid = x.owner or (m.uid, m.gid)
        mode = m.mode & 0o7777
        try:
            existing = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None and not (m.isdir() and stat.S_ISDIR(existing.st_mode)):
            if stat.S_ISDIR(existing.st_mode):
                import shutil

                shutil.rmtree(os.path.join(f"/proc/self/fd/{pfd}", name))
            else:
                os.unlink(name, dir_fd=pfd)
            if not stat.S_ISREG(existing.st_mode):  # a path through it may now lead elsewhere
                pfd = x.reopen(parts[:-1])
        if m.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                os.mkdir(name, 0o700, dir_fd=pfd)
            os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
            os.chmod(name, mode, dir_fd=pfd)
            x.dirs.append((os.readlink(f"/proc/self/fd/{pfd}") + "/" + name, int(m.mtime)))
        elif m.issym():
            _check_link_target(parts, m.linkname, os.readlink(f"/proc/self/fd/{pfd}"),
                               x.image_root)
            os.symlink(m.linkname, name, dir_fd=pfd)
            pfd = x.reopen(parts[:-1])
            os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
        elif m.islnk():
            target = _clean_member(m.linkname)
            if not target:
                raise _Refused(f"hard link to the destination itself ({m.linkname!r})")
            sfd = x.parent_fd(target[:-1])
            pfd = x.parent_fd(parts[:-1])  # the same fd cache: sfd may have evicted it
            try:
                os.link(target[-1], name, src_dir_fd=sfd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                raise _Refused(f"hard link to {m.linkname!r}, which is not in the "
                               "destination") from None
            return
        elif m.isfifo():
            os.mkfifo(name, mode, dir_fd=pfd)
            os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
        elif m.isreg():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=pfd)
            try:
                src = tar.extractfile(m)
                while src is not None:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    x.written += len(chunk)
                    if x.written > limits.max_total_bytes:
                        raise _Refused(f"more than {limits.max_total_bytes} bytes")
                    write_all(fd, chunk)
                os.fchown(fd, uid, gid)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
        else:
            return
        _xattrs(pfd, name, m)
        if not m.isdir():
            os.utime(name, (m.mtime, m.mtime), dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError as e:
        raise _Refused(f"cannot create it: {e.strerror}") from None


def _check_link_target(parts: list[str], target: str, parent_host: str,
                       image_root: str) -> None:
    """A symlink may point anywhere inside the image: above the ADD destination too (docker
    keeps ``symldir1 -> ..``, and names through it resolve inside the destination, docker's
    chroot), but not above the image's root (docker would keep that too, clamped; kiln
    refuses it). Absolute targets are read inside the image."""
    if target.startswith("/"):
        return
    rel = os.path.relpath(parent_host, image_root)
    depth = 0 if rel == "." else len(rel.split(os.sep))
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                raise _Refused(f"symlink {'/'.join(parts)} -> {target} points outside of the "
                               "image's root")
        elif part not in ("", "."):
            depth += 1


def _xattrs(pfd: int, name: str, m: tarfile.TarInfo) -> None:
    for key, value in m.pax_headers.items():
        if not key.startswith("SCHILY.xattr."):
            continue
        attr = key[len("SCHILY.xattr."):]
        if attr.startswith("trusted.") or is_overlay_xattr(attr):
            continue  # overlayfs' own attributes (whiteouts, opaque dirs) among them
        with contextlib.suppress(OSError):  # best effort, as docker
            os.setxattr(f"/proc/self/fd/{pfd}/{name}", attr,
                        value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
