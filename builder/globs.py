"""COPY/ADD source patterns, matched the way BuildKit matches them.

One implementation for every source: the build context (``builder.context``) and another
stage's or image's tree (``builder.copy``) select with the same rules.

A plain source is split before its first component that holds an unescaped wildcard (``*``,
``?`` or ``[``), as fsutil's ``splitWildcards`` does. The leading components name a directory
literally (a backslash there is part of the name); the rest is matched with Go's
``filepath.Match`` against the path of every entry below that directory. So ``*`` and ``?``
never cross a ``/`` and ``**`` is simply ``*``; ``\\?``, ``\\[`` and ``\\*`` match the character
itself; ``[[]`` is a literal ``[`` (the Dockerfile reference's advice). A matched directory is
copied whole and nothing below it is matched again (BuildKit's walk skips it). A wildcard may
match nothing (BuildKit's AllowEmptyWildcard), but its directory must exist.

``COPY --parents`` sources follow BuildKit's include patterns instead: ``<pivot>/./<pattern>``
(or ``<pattern>`` alone, below the root) keeps, below each directory the pivot names (a pivot may
hold wildcards itself), every entry that ``<pattern>`` matches with .dockerignore syntax, where
``**`` spans any number of directories, and everything below a matched directory.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterable

from builder.ignore import IgnoreError, compile_glob, compile_pattern
from store.errors import KilnError

# What a caller knows about a path: "file", "dir", "symlink", or None when it does not exist.
KindOf = Callable[[str], "str | None"]


class GlobError(KilnError):
    """A source pattern is malformed."""


class SourceMissing(LookupError):
    """A path a source needs (its directory, or the source itself) does not exist."""

    def __init__(self, path: str, kind: str | None = None):
        super().__init__(path)
        self.path = path
        self.kind = kind  # what is there instead ("symlink", "file"), or None


def has_wildcards(path: str) -> bool:
    """True if ``path`` has an unescaped ``*``, ``?`` or ``[`` (BuildKit's containsWildcards)."""
    i, n = 0, len(path)
    while i < n:
        ch = path[i]
        if ch == "\\":
            i += 2
            continue
        if ch in "*?[":
            return True
        i += 1
    return False


def clean(path: str) -> str:
    """A source path made relative and lexically clean; '' is the root. ``..`` stops there,
    as it does for BuildKit, which joins every source onto ``/``."""
    cleaned = posixpath.normpath("/" + path).lstrip("/")
    return "" if cleaned == "." else cleaned


def split_wildcards(path: str) -> tuple[str, str]:
    """(literal directory, wildcard rest) of a clean relative path; rest is '' without one."""
    parts = path.split("/") if path else []
    for i, part in enumerate(parts):
        if has_wildcards(part):
            return "/".join(parts[:i]), "/".join(parts[i:])
    return path, ""


def _components(path: str) -> list[str]:
    return path.split("/")


def _outermost(hits: Iterable[str], kind: KindOf) -> list[str]:
    """``hits`` in walk order (each directory before its entries, names sorted), without what
    lies below a matched directory."""
    out: list[str] = []
    skip: str | None = None
    for path in sorted(hits, key=_components):
        if skip is not None and path.startswith(skip):
            continue
        out.append(path)
        skip = path + "/" if kind(path) == "dir" else None
    return out


def _filepath_match(pattern: str) -> Callable[[str], bool]:
    try:
        return compile_glob(pattern)
    except IgnoreError:
        raise GlobError(f"invalid pattern {pattern!r}: syntax error in pattern") from None


def matches(pattern: str, path: str) -> bool:
    """Whether the clean relative ``path`` matches ``pattern`` whole (``*`` stays within a
    component); a malformed pattern matches nothing."""
    try:
        return _filepath_match(pattern)(path)
    except GlobError:
        return False


def _require_dir(path: str, kind: KindOf) -> str | None:
    """The kind of the directory a wildcard is matched in; raises SourceMissing when it is
    absent or a symlink (kiln follows no symlink in a source path)."""
    if not path:
        return "dir"
    what = kind(path)
    if what is None or what == "symlink":
        raise SourceMissing(path, what)
    return what


def match_wildcards(source: str, paths: Iterable[str], kind: KindOf) -> list[str] | None:
    """The paths a plain COPY/ADD source names, in BuildKit's order; None if it has no wildcard
    (it then names the one path ``source``, for the caller to look up).

    ``source`` is clean and relative ('' for the root); ``paths`` are every entry of the source
    tree, relative to its root; ``kind`` says what a path is. Raises SourceMissing when the
    directory the wildcard is matched in does not exist, GlobError for a malformed pattern.
    """
    base, pattern = split_wildcards(source)
    if not pattern:
        return None
    match = _filepath_match(pattern)
    if _require_dir(base, kind) != "dir":
        return []  # BuildKit walks a file and finds nothing below it
    prefix = base + "/" if base else ""
    start = len(prefix)
    return _outermost((p for p in paths if p.startswith(prefix) and match(p[start:])), kind)


def match_parents(source: str, paths: Iterable[str], kind: KindOf) -> list[tuple[str, str]]:
    """``COPY --parents``: (path, pivot) for each entry ``source`` selects whole, in order.

    The copy keeps each path's part below its pivot ('' when the source has no ``/./``).
    Raises SourceMissing for a pivot without wildcards that does not exist, or for a source
    without any wildcard whose path does not exist; GlobError for a malformed pattern.
    """
    pivot_text, sep, rest = source.partition("/./")
    if not sep:
        pivot_text, rest = "", source
    pivot, pattern = clean(pivot_text), clean(rest)
    paths = list(paths)
    if has_wildcards(pivot):
        pivots = [p for p in match_wildcards(pivot, paths, kind) or [] if kind(p) == "dir"]
    else:
        _require_dir(pivot, kind)
        pivots = [pivot]
    if not has_wildcards(pattern) and not has_wildcards(pivot):
        whole = posixpath.join(pivot, pattern) if pattern else pivot
        if whole and kind(whole) is None:
            raise SourceMissing(whole)
    if not pattern:
        return [(pv, pv) for pv in pivots]
    try:
        include = compile_pattern(pattern)
    except IgnoreError:
        raise GlobError(f"invalid pattern {pattern!r}: syntax error in pattern") from None
    out: list[tuple[str, str]] = []
    for pv in pivots:
        prefix = pv + "/" if pv else ""
        start = len(prefix)
        hits = (p for p in paths if p.startswith(prefix) and include(p[start:]))
        out += [(p, pv) for p in _outermost(hits, kind)]
    return out

