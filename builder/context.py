"""The build context: which files a build may see, and content digests for COPY/ADD cache keys.

A ``Context`` walks the context directory once (``lstat`` only), leaving out what the ignore
file excludes and never descending into an excluded directory unless a ``!`` pattern could
re-include something below it. File contents are hashed only when asked for (``files()`` hashes
everything, ``select()`` only what a COPY names), and a stat cache on disk remembers
(path, size, mtime, ctime, inode, device) -> sha256 so that a rebuild reads no unchanged file.

Symlinks are recorded as symlinks and never followed. Special files (fifos, sockets, devices)
are left out of ``files()``; a COPY that names one, directly, by glob, or through a directory,
fails with ContextError, as docker's does.

Racy entries: a file changed twice within one timestamp tick keeps its stat, so an entry whose
mtime or ctime is within ``RACY_WINDOW_NS`` of the moment the cache is written is never saved;
such a file is hashed again next time (once it is older, its entry sticks).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from builder.ignore import IgnoreMatcher, clean_path
from store.errors import KilnError
from store.fsutil import fsync_dir

CACHE_FORMAT = "kiln-context-stat-cache"
CACHE_VERSION = 1
MAX_CACHE_BYTES = 256 << 20
MAX_CACHE_ENTRIES = 2_000_000
RACY_WINDOW_NS = 2_000_000_000
HASH_AHEAD_BYTES = 256 << 20  # what hash_ahead reads at most: more is left for COPY
_HASH_ATTEMPTS = 3
_DIGEST_PREFIX = "sha256:"
_LOWER_HEX = "0123456789abcdef"

_SPECIAL_KINDS = {
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


class ContextError(KilnError):
    """The build context cannot be read, or a COPY/ADD source is not in it."""


def default_containerfile(context_dir: str | os.PathLike) -> str | None:
    """The Containerfile a build without -f reads: Containerfile, else Dockerfile."""
    for name in ("Containerfile", "Dockerfile"):
        path = os.path.join(context_dir, name)
        if os.path.isfile(path):
            return path
    return None


def open_build_context(cache_dir: str | os.PathLike, context_dir: str | os.PathLike,
                       containerfile: str | os.PathLike | None, *,
                       stat_cache: bool = True) -> Context:
    """The context of a build as the builder reads it: its ignore file (the one beside
    ``containerfile`` first) applied, and its stat cache under the store's ``cache_dir``
    (none with ``stat_cache=False``: a context made for one build)."""
    from builder.ignore import IgnoreMatcher, read_ignore_file

    patterns = read_ignore_file(context_dir, containerfile)
    cache_path = None
    if stat_cache:
        context_id = hashlib.sha256(os.fsencode(os.path.abspath(context_dir))).hexdigest()
        directory = os.path.join(cache_dir, "context")
        os.makedirs(directory, exist_ok=True)
        cache_path = os.path.join(directory, context_id + ".json")
    return Context(context_dir, ignore=IgnoreMatcher(patterns), cache_path=cache_path)


@dataclass(slots=True)  # not frozen: a no-op rebuild makes thousands, twice as fast so
class ContextFile:
    path: str  # relative to the context root, '/'-separated
    kind: str  # "file" | "dir" | "symlink"
    mode: int  # permission bits incl. setuid/setgid/sticky
    size: int  # bytes for files, len(target) for symlinks, 0 for directories
    link_target: str | None
    digest: str | None  # "sha256:<hex>" of the content, files only


@dataclass(slots=True)
class _Node:
    path: str
    kind: str
    mode: int
    size: int
    link_target: str | None = None
    stat_key: tuple[int, int, int, int, int] | None = None  # size, mtime, ctime, ino, dev
    nlink: int = 1  # only a file with more than one link can be a hardlink of another
    digest: str | None = None
    from_cache: bool = False
    entry: ContextFile | None = None


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _fs(path: str) -> bytes:
    """A name as the bytes on disk; sorting by these is Go's (and tar's) byte order."""
    return path.encode("utf-8", "surrogateescape")


class Context:
    def __init__(self, root: str | os.PathLike, *, ignore: IgnoreMatcher | None = None,
                 cache_path: str | os.PathLike | None = None):
        self.root = Path(root)
        try:
            st = os.stat(self.root)
        except OSError as e:
            raise ContextError(f"build context {self.root}: {e.strerror}") from e
        if not stat.S_ISDIR(st.st_mode):
            raise ContextError(f"build context {self.root} is not a directory")
        self._root_str = os.fspath(self.root)
        self._ignore = ignore if ignore else None
        self._cache_path = Path(cache_path) if cache_path is not None else None
        self._nodes: dict[str, _Node] | None = None
        self._had_cache = False  # a non-empty stat cache was read
        self._order: list[str] = []
        self._order_keys: list[bytes] = []
        self._specials: dict[str, str] = {}
        self._dirs: list[tuple[str, tuple]] = []  # every directory walked, with its stat key
        self.stats = {"files_hashed": 0, "bytes_hashed": 0, "cache_hits": 0,
                      "entries": 0, "dirs_pruned": 0}

    # -- scanning ----------------------------------------------------------------------------

    def _load_cache(self) -> dict[str, list]:
        if self._cache_path is None:
            return {}
        try:
            with open(self._cache_path, "rb") as f:
                raw = f.read(MAX_CACHE_BYTES + 1)
        except OSError:
            return {}
        if len(raw) > MAX_CACHE_BYTES:
            return {}
        try:
            doc = json.loads(raw)
        except ValueError:
            return {}
        # A cache of another format, version or context is useless, never an error.
        if (not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT
                or doc.get("version") != CACHE_VERSION
                or doc.get("root") != os.path.abspath(self._root_str)
                or not isinstance(doc.get("entries"), dict)):
            return {}
        return doc["entries"]

    def _scan(self) -> dict[str, _Node]:
        if self._nodes is not None:
            return self._nodes
        cached = self._load_cache()
        self._had_cache = bool(cached)
        ignore = self._ignore
        nodes: dict[str, _Node] = {}
        maybe_parents: dict[str, _Node] = {}  # excluded dirs walked for '!' re-inclusions
        self._dirs = [("", _stat_key(os.lstat(self._root_str)))]
        stack = [("", self._root_str)]
        while stack:
            rel_dir, abs_dir = stack.pop()
            try:
                with os.scandir(abs_dir) as it:
                    dir_entries = list(it)
            except OSError as e:
                raise ContextError(f"cannot read directory {rel_dir or '.'!r} of the build "
                                   f"context: {e.strerror}") from e
            for de in dir_entries:
                rel = f"{rel_dir}/{de.name}" if rel_dir else de.name
                try:
                    st = de.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while we looked
                except OSError as e:
                    raise ContextError(f"cannot stat {rel!r} in the build context: "
                                       f"{e.strerror}") from e
                excluded = ignore is not None and ignore.matches(rel)
                fmt = stat.S_IFMT(st.st_mode)
                mode = stat.S_IMODE(st.st_mode)
                if fmt == stat.S_IFDIR:
                    if excluded and not ignore.may_match_inside(rel):
                        self.stats["dirs_pruned"] += 1
                        continue
                    node = _Node(rel, "dir", mode, 0)
                    (maybe_parents if excluded else nodes)[rel] = node
                    stack.append((rel, de.path))
                    self._dirs.append((rel, _stat_key(st)))
                    continue
                if excluded:
                    continue
                if fmt == stat.S_IFREG:
                    node = _Node(rel, "file", mode, st.st_size, stat_key=_stat_key(st),
                                 nlink=st.st_nlink)
                    hit = cached.get(rel)
                    if (isinstance(hit, list) and len(hit) == 6
                            and tuple(hit[:5]) == node.stat_key and isinstance(hit[5], str)
                            and len(hit[5]) == 64 and not hit[5].strip(_LOWER_HEX)):
                        node.digest = _DIGEST_PREFIX + hit[5]
                        node.from_cache = True
                    nodes[rel] = node
                elif fmt == stat.S_IFLNK:
                    try:
                        target = os.readlink(de.path)
                    except OSError as e:
                        raise ContextError(f"cannot read symlink {rel!r} in the build context: "
                                           f"{e.strerror}") from e
                    nodes[rel] = _Node(rel, "symlink", mode, len(_fs(target)), link_target=target,
                                       stat_key=_stat_key(st))
                else:
                    self._specials[rel] = _SPECIAL_KINDS.get(fmt, "special file")
        if maybe_parents:
            # An excluded directory is kept only as the parent of something re-included.
            for rel in list(nodes) + list(self._specials):
                parent = rel.rpartition("/")[0]
                while parent and parent not in nodes and parent in maybe_parents:
                    nodes[parent] = maybe_parents[parent]
                    parent = parent.rpartition("/")[0]
        keyed = sorted((_fs(p), p) for p in nodes)
        self._order = [p for _, p in keyed]
        self._order_keys = [k for k, _ in keyed]
        self._nodes = nodes
        self.stats["entries"] = len(nodes)
        return nodes

    # -- hashing -----------------------------------------------------------------------------

    def _hash(self, node: _Node) -> None:
        abs_path = os.path.join(self._root_str, node.path)
        for _ in range(_HASH_ATTEMPTS):
            try:
                fd = os.open(abs_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                raise ContextError(f"cannot read {node.path!r} in the build context: "
                                   f"{e.strerror}") from e
            with open(fd, "rb") as f:
                before = os.fstat(fd)
                if not stat.S_ISREG(before.st_mode):
                    raise ContextError(f"{node.path!r} in the build context is no longer a "
                                       "regular file")
                try:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                except OSError as e:
                    raise ContextError(f"cannot read {node.path!r} in the build context: "
                                       f"{e.strerror}") from e
                after = os.fstat(fd)
            self.stats["files_hashed"] += 1
            self.stats["bytes_hashed"] += after.st_size
            if _stat_key(before) == _stat_key(after):
                # The content hashed is the one this stat describes (maybe newer than the scan).
                node.stat_key = _stat_key(after)
                node.nlink = after.st_nlink
                node.size = after.st_size
                node.mode = stat.S_IMODE(after.st_mode)
                node.digest = _DIGEST_PREFIX + digest
                return
        raise ContextError(f"{node.path!r} in the build context kept changing while it was read")

    def _entry(self, node: _Node) -> ContextFile:
        if node.entry is None:
            if node.kind == "file":
                if node.digest is None:
                    self._hash(node)
                elif node.from_cache:
                    self.stats["cache_hits"] += 1
            node.entry = ContextFile(node.path, node.kind, node.mode, node.size,
                                     node.link_target, node.digest)
        return node.entry

    def hash_ahead(self, lock, stop) -> None:
        """Hash the files the stat cache does not know, one at a time under ``lock`` (the
        builder's, which every other use of the context holds), until ``stop`` is set: a
        thread of the builder does this while the first steps run, and COPY then finds its
        sources hashed. Any error is left for the COPY that meets it to report; a context
        with more than HASH_AHEAD_BYTES to read is left to COPY (it may need little of it)."""
        try:
            with lock:
                nodes = [n for n in self._scan().values()
                         if n.kind == "file" and n.digest is None]
            if sum(n.size for n in nodes) > HASH_AHEAD_BYTES:
                return
            for node in nodes:
                if stop.is_set():
                    return
                with lock:
                    if node.digest is None:
                        self._hash(node)
        except (ContextError, OSError):
            return

    # -- public API --------------------------------------------------------------------------

    def files(self) -> list[ContextFile]:
        """Every included entry (files, directories, symlinks), sorted by path; hashes files."""
        nodes = self._scan()
        return [self._entry(nodes[p]) for p in self._order]

    def _subtree(self, directory: str) -> list[str]:
        lo_key = _fs(directory + "/")
        hi_key = _fs(directory + "0")  # '0' sorts right after '/'
        lo = bisect.bisect_left(self._order_keys, lo_key)
        hi = bisect.bisect_left(self._order_keys, hi_key)
        return self._order[lo:hi]

    def _specials_under(self, rel: str) -> list[str]:
        return [p for p in self._specials if not rel or p == rel or p.startswith(rel + "/")]

    def _refuse_specials(self, source: str, paths: list[str]) -> None:
        if paths:
            first = sorted(paths, key=_fs)[0]
            raise ContextError(f"COPY source {source!r}: cannot copy {first!r}, a "
                               f"{self._specials[first]}")

    def select(self, sources: list[str], *, parents: bool = False) -> list[ContextFile]:
        """The entries a COPY/ADD source list names, sorted, without duplicates.

        A directory brings its whole subtree (and itself). Globs match as BuildKit's do
        (builder.globs; with ``parents``, as ``COPY --parents`` patterns): a glob that matches
        nothing selects nothing, but the directory it is matched in must exist. A plain path
        that is missing or excluded is an error; so is a path that leaves the context.
        """
        from builder import globs

        nodes = self._scan()
        kind = self._kind
        chosen: set[str] = set()
        # special files take part in matching only to be refused when a source names one
        candidates = self._order + list(self._specials) if self._specials else self._order
        for source in sources:
            rel = _clean_source(source)
            try:
                if parents:  # the source itself: cleaning would lose a /./ pivot
                    hits = [p for p, _ in globs.match_parents(source, candidates, kind)]
                else:
                    hits = globs.match_wildcards(rel, candidates, kind)
            except globs.GlobError as e:
                raise ContextError(f"COPY source {source!r}: {e}") from None
            except globs.SourceMissing as e:
                raise ContextError(self._missing_reason(source, e.path)) from None
            if hits is None:  # a plain path
                if rel == "":
                    self._refuse_specials(source, list(self._specials))
                    chosen.update(self._order)
                    continue
                if rel not in nodes and rel not in self._specials:
                    raise ContextError(self._missing_reason(source, rel))
                hits = [rel]
            self._refuse_specials(source, [p for p in hits if p in self._specials])
            for p in hits:
                if p == "":
                    self._refuse_specials(source, list(self._specials))
                    chosen.update(self._order)
                    continue
                chosen.add(p)
                if nodes[p].kind == "dir":
                    self._refuse_specials(source, self._specials_under(p))
                    chosen.update(self._subtree(p))
        if len(chosen) * 8 > len(self._order):  # much of it: the scan's order, no sorting
            ordered = [p for p in self._order if p in chosen]
        else:
            ordered = sorted(chosen, key=_fs)
        return [self._entry(nodes[p]) for p in ordered]

    def _kind(self, path: str) -> str | None:
        node = self._nodes.get(path) if self._nodes is not None else None
        if node is not None:
            return node.kind
        return "special" if path in self._specials else None

    def entry(self, path: str) -> ContextFile | None:
        """The entry at ``path`` (relative, clean), or None; hashes it if it is a file."""
        node = self._scan().get(path)
        return self._entry(node) if node is not None else None

    def _missing_reason(self, source: str, rel: str) -> str:
        if (self._ignore is not None and self._ignore.matches(rel)
                and os.path.lexists(os.path.join(self._root_str, rel))):
            return (f"COPY source {source!r} is excluded by the ignore file "
                    "(.containerignore/.dockerignore)")
        parent = rel  # a glob's directory may be the symlink itself
        while parent:
            if os.path.islink(os.path.join(self._root_str, parent)):
                return (f"COPY source {source!r}: {parent!r} is a symlink, and paths through "
                        "symlinks in the build context are not followed")
            parent = parent.rpartition("/")[0]
        if rel != _clean_source(source):  # the directory a glob or a --parents pivot needs
            return f"COPY source {source!r}: {rel!r}: no such directory in the build context"
        return f"COPY source {source!r}: no such file or directory in the build context"

    def link_target(self, rel: str) -> str | None:
        """The target of the symlink at ``rel`` ('/'-separated, clean), or None if there is no
        symlink there (or it is excluded)."""
        node = self._scan().get(rel)
        return node.link_target if node is not None and node.kind == "symlink" else None

    def has(self, rel: str) -> bool:
        """Whether ``rel`` ('' the root) is in the context (not excluded)."""
        return rel == "" or rel in self._scan()

    def digest_of(self, entries: list[ContextFile], *,
                  dest_names: list[str] | None = None) -> str:
        """One sha256 over the names, kinds, modes, symlink targets and content digests of
        ``entries``, in the order given. Never mtimes or owners. ``dest_names``, when given,
        replaces the context paths (a COPY result depends on where files land, not on where
        they came from)."""
        if dest_names is not None and len(dest_names) != len(entries):
            raise ValueError("dest_names must name every entry")
        h = hashlib.sha256(b"kiln-context-digest\0v1\0")
        for i, e in enumerate(entries):
            name = dest_names[i] if dest_names is not None else e.path
            if "\0" in name:
                raise ValueError(f"a file name cannot contain NUL: {name!r}")
            # Five NUL-terminated fields per entry; no field can contain NUL, so no ambiguity.
            h.update(b"\0".join([_fs(name), e.kind.encode(), b"%o" % e.mode,
                                 _fs(e.link_target or ""), (e.digest or "").encode(), b""]))
        return _DIGEST_PREFIX + h.hexdigest()

    def hardlink_groups(self, entries: list[ContextFile]) -> list[list[str]]:
        """The files of ``entries`` that are one inode (hardlinks of each other), as lists of
        their paths in the order given; from the scan's stat, nothing is read again. A COPY
        keeps such links, so its cache key needs them: digest_of sees only contents."""
        nodes = self._scan()
        by_inode: dict[tuple[int, int], list[str]] = {}
        for e in entries:
            node = nodes.get(e.path)
            if (e.kind == "file" and node is not None and node.nlink > 1
                    and node.stat_key is not None):
                by_inode.setdefault(node.stat_key[3:5], []).append(e.path)
        return [paths for paths in by_inode.values() if len(paths) > 1]

    def _trusted_entries(self, cutoff_ns: int) -> dict[str, list]:
        entries: dict[str, list] = {}
        for path in self._order:
            node = self._nodes[path]
            if node.kind != "file" or node.digest is None or node.stat_key is None:
                continue
            if max(node.stat_key[1], node.stat_key[2]) >= cutoff_ns:
                continue  # racy: it could change again without its stat changing
            entries[path] = [*node.stat_key, node.digest[len(_DIGEST_PREFIX):]]
            if len(entries) >= MAX_CACHE_ENTRIES:
                break
        return entries

    def fingerprint(self) -> dict | None:
        """The stat keys of every directory walked and every file and symlink let in, once
        they are hashed: while each still has its key, the context is the same (a directory
        keeps its key while no entry is added, removed or renamed in it). None when a key
        is too recent to tell a later change from it (the stat cache's racy window), or
        the context holds special files."""
        if self._nodes is None or self._specials:
            return None
        now = time.time_ns()
        entries = [[rel, *key] for rel, key in self._dirs]
        entries += [[n.path, *n.stat_key] for n in self._nodes.values()
                    if n.kind in ("file", "symlink") and n.stat_key is not None]
        if any(max(e[2], e[3]) >= now - RACY_WINDOW_NS for e in entries):
            return None
        return {"root": os.path.abspath(self._root_str), "entries": entries}

    def save_cache(self) -> None:
        """Write the stat cache atomically (temp file + rename). Racy entries are left out."""
        if self._cache_path is None or self._nodes is None:
            return
        if self.stats["files_hashed"] == 0 and self._had_cache:
            # every digest came from the cache (a file gets one only from it or by hashing):
            # nothing new was learnt, and a no-op rebuild writes (and fsyncs) nothing
            return
        target = self._cache_path
        directory = target.parent
        directory.mkdir(parents=True, exist_ok=True)
        import tempfile  # with shutil and random: not when nothing new was learnt

        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with open(fd, "wb") as f:
                # The file system's own clock (the new file's mtime) and ours; trust the earlier.
                now = min(os.fstat(fd).st_mtime_ns, time.time_ns())
                doc = {"format": CACHE_FORMAT, "version": CACHE_VERSION,
                       "root": os.path.abspath(self._root_str), "written_ns": now,
                       "entries": self._trusted_entries(now - RACY_WINDOW_NS)}
                # ASCII JSON: undecodable names travel as \udcXX escapes and come back intact.
                f.write(json.dumps(doc, separators=(",", ":")).encode("ascii"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        try:
            fsync_dir(directory)
        except OSError:
            return


def _clean_source(source: str) -> str:
    """A COPY/ADD source -> a path relative to the context root ('' for the root itself)."""
    if not source.strip():
        raise ContextError("COPY source is empty")
    cleaned = clean_path(source.lstrip("/") or ".")
    if cleaned == ".." or cleaned.startswith("../"):
        raise ContextError(f"COPY source {source!r} is outside the build context")
    return "" if cleaned == "." else cleaned
