""".containerignore / .dockerignore: finding the file, reading it, and matching paths.

The semantics are those of moby/patternmatcher (used by docker, BuildKit and buildah):

* a file becomes a pattern list as ``ignorefile.ReadAll`` does: ``#`` comments only at
  column 0, whitespace trimmed, ``!`` handled before the path is cleaned, one leading ``/``
  dropped;
* a pattern list is compiled as ``patternmatcher.New`` does (trim, clean, then ``!``), with
  ``filepath.Match`` syntax errors reported at once;
* a path is excluded by the last pattern that matches it or one of its parent directories
  (``MatchesOrParentMatches``); ``!`` patterns re-include.

Deliberate differences from upstream, all about patterns nobody should rely on: an escaped
character (``\\x``) is always the literal ``x`` (upstream passes it to RE2, so ``\\d`` there
means a digit), ``^`` outside a class is a literal (upstream leaves it as a regexp anchor, so
such a pattern never matches), and a character class means exactly what ``filepath.Match``
says (upstream's translation mangles wildcards written inside a class).
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from store.errors import KilnError

# A .dockerignore is a short text file; a runaway one is refused, not slurped.
MAX_IGNORE_FILE_BYTES = 4 << 20
# Go's bufio.Scanner gives up on a longer line, so docker rejects the file too.
MAX_IGNORE_LINE_BYTES = 64 * 1024
_DIR_CACHE_LIMIT = 65536

# Go's unicode.IsSpace set (str.strip() would also remove \x1c-\x1f).
_GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)
_UTF8_BOM = b"\xef\xbb\xbf"


class IgnoreError(KilnError):
    """An ignore file cannot be read, or one of its patterns is malformed."""


def go_trim_space(text: str) -> str:
    return text.strip(_GO_SPACE)


def clean_path(path: str) -> str:
    """Go's ``filepath.Clean`` on a '/'-separated path (lexical; never touches the disk)."""
    cleaned = posixpath.normpath(path) if path else "."
    if cleaned.startswith("//"):  # POSIX lets normpath keep exactly two; Go does not
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


# ---------------------------------------------------------------------------------------------
# Reading ignore files


def ignore_file_candidates(context_dir: str | os.PathLike,
                           dockerfile_path: str | os.PathLike | None = None) -> list[Path]:
    """The files consulted, in order; the first that exists wins.

    ``<Containerfile>.containerignore`` / ``<Containerfile>.dockerignore`` beside the
    Containerfile (BuildKit and buildah), then ``.containerignore`` and ``.dockerignore`` in the
    context root (buildah/podman prefer the former).
    """
    candidates = []
    if dockerfile_path is not None:
        df = Path(dockerfile_path)
        candidates += [df.with_name(df.name + ".containerignore"),
                       df.with_name(df.name + ".dockerignore")]
    root = Path(context_dir)
    candidates += [root / ".containerignore", root / ".dockerignore"]
    return candidates


def find_ignore_file(context_dir: str | os.PathLike,
                     dockerfile_path: str | os.PathLike | None = None) -> Path | None:
    for candidate in ignore_file_candidates(context_dir, dockerfile_path):
        if os.path.exists(candidate):  # a dangling symlink counts as absent
            return candidate
    return None


def read_ignore_file(context_dir: str | os.PathLike,
                     dockerfile_path: str | os.PathLike | None = None) -> list[str]:
    """The pattern list of the ignore file that applies, or [] when there is none."""
    path = find_ignore_file(context_dir, dockerfile_path)
    if path is None:
        return []
    return parse_ignore_content(_read_bounded(path), source=str(path))


def _read_bounded(path: Path) -> bytes:
    try:
        # O_NONBLOCK: a fifo named .dockerignore must not hang the build.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise IgnoreError(f"cannot open ignore file {path}: {e.strerror}") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IgnoreError(f"ignore file {path} is not a regular file")
    with open(fd, "rb", buffering=0) as f:
        try:
            data = f.read(MAX_IGNORE_FILE_BYTES + 1)
        except OSError as e:
            raise IgnoreError(f"cannot read ignore file {path}: {e.strerror}") from e
    if len(data) > MAX_IGNORE_FILE_BYTES:
        raise IgnoreError(f"ignore file {path} is larger than {MAX_IGNORE_FILE_BYTES} bytes")
    return data


def parse_ignore_content(data: bytes | None, *, source: str = "ignore file") -> list[str]:
    """An ignore file's bytes -> pattern list, as moby/patternmatcher's ``ignorefile.ReadAll``."""
    if data is None:
        return []
    patterns = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if len(raw) > MAX_IGNORE_LINE_BYTES:
            raise IgnoreError(f"{source}: line {number} is longer than {MAX_IGNORE_LINE_BYTES} "
                              "bytes")
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if number == 1 and raw.startswith(_UTF8_BOM):
            raw = raw[len(_UTF8_BOM):]
        line = raw.decode("utf-8", "surrogateescape")
        if line.startswith("#"):  # only at column 0; "  # x" is the pattern "# x"
            continue
        pattern = go_trim_space(line)
        if not pattern:
            continue
        invert = pattern.startswith("!")
        if invert:
            pattern = go_trim_space(pattern[1:])
        if pattern:
            pattern = clean_path(pattern)
            if len(pattern) > 1 and pattern.startswith("/"):
                pattern = pattern[1:]
        patterns.append("!" + pattern if invert else pattern)
    return patterns


# ---------------------------------------------------------------------------------------------
# Patterns -> tokens -> regexps
#
# A pattern is tokenised once. The tokens drive both the regexp used for matching and the small
# NFA that decides whether a pattern could match something below a directory.

_LIT, _ANY1, _STAR, _DOTSTAR, _OPTDIR, _CLASS = range(6)


@dataclass(frozen=True)
class _Class:
    negated: bool
    ranges: tuple[tuple[str, str], ...]

    def contains(self, ch: str) -> bool:
        inside = any(lo <= ch <= hi for lo, hi in self.ranges)
        return inside != self.negated

    def regex(self) -> str:
        ranges = [(lo, hi) for lo, hi in self.ranges if lo <= hi]
        if not ranges:
            return r"[\s\S]" if self.negated else "(?!)"
        body = "".join(re.escape(lo) if lo == hi else f"{re.escape(lo)}-{re.escape(hi)}"
                       for lo, hi in ranges)
        return f"[{'^' if self.negated else ''}{body}]"


_Token = tuple  # (_LIT, ch) | (_ANY1,) | (_STAR,) | (_DOTSTAR,) | (_OPTDIR,) | (_CLASS, _Class)


class _SyntaxError(Exception):
    pass


def _class_char(p: str, j: int) -> tuple[str, int]:
    """One element of a [...] class, with filepath.Match's rules (its ``getEsc``)."""
    if j >= len(p) or p[j] in "-]":
        raise _SyntaxError
    if p[j] == "\\":
        j += 1
        if j >= len(p):
            raise _SyntaxError
    ch = p[j]
    if "\udc80" <= ch <= "\udcff":  # an undecodable byte (surrogateescape)
        raise _SyntaxError
    j += 1
    if j >= len(p):  # a class must still be closed
        raise _SyntaxError
    return ch, j


def _parse_class(p: str, i: int) -> tuple[_Class, int]:
    j = i + 1
    negated = j < len(p) and p[j] == "^"
    if negated:
        j += 1
    ranges: list[tuple[str, str]] = []
    while True:
        if j < len(p) and p[j] == "]" and ranges:
            return _Class(negated, tuple(ranges)), j + 1
        lo, j = _class_char(p, j)
        hi = lo
        if j < len(p) and p[j] == "-":
            hi, j = _class_char(p, j + 1)
        ranges.append((lo, hi))


def _tokenize(p: str, *, double_star: bool) -> tuple[list[_Token], str]:
    """Tokens of a pattern and patternmatcher's match strategy for it.

    The strategy (exact / prefix / suffix / regexp) is upstream's; it matters because the
    suffix strategy is not component-aware (``**file`` matches ``dir/myfile``).
    """
    tokens: list[_Token] = []
    kind = "exact"
    i, n = 0, len(p)
    while i < n:
        ch = p[i]
        at_start = i == 0
        if ch == "*":
            if double_star and i + 1 < n and p[i + 1] == "*":
                i += 2
                if i < n and p[i] == "/":  # "**/" is treated like "**"
                    i += 1
                if i >= n:
                    kind = "prefix" if kind == "exact" else "regexp"
                    tokens.append((_DOTSTAR,))
                else:
                    kind = "regexp"
                    tokens.append((_OPTDIR,))
                if at_start:
                    kind = "suffix"
                continue
            tokens.append((_STAR,))
            kind = "regexp"
            i += 1
        elif ch == "?":
            tokens.append((_ANY1,))
            kind = "regexp"
            i += 1
        elif ch == "\\":
            if i + 1 >= n:
                raise _SyntaxError
            tokens.append((_LIT, p[i + 1]))
            kind = "regexp"
            i += 2
        elif ch == "[":
            cls, i = _parse_class(p, i)
            tokens.append((_CLASS, cls))
            kind = "regexp"
        else:
            if ch == "]":
                kind = "regexp"
            tokens.append((_LIT, ch))
            i += 1
    if kind == "exact":
        tokens = [(_LIT, c) for c in p]
    elif kind == "suffix":
        suffix = p[2:]
        if suffix.startswith("/"):
            tokens = [(_OPTDIR,)] + [(_LIT, c) for c in suffix[1:]]
        else:
            tokens = [(_DOTSTAR,)] + [(_LIT, c) for c in suffix]
    return tokens, kind


def _tokens_regex(tokens: list[_Token]) -> str:
    parts = []
    for tok in tokens:
        t = tok[0]
        if t == _LIT:
            parts.append(re.escape(tok[1]))
        elif t == _ANY1:
            parts.append("[^/]")
        elif t == _STAR:
            parts.append("[^/]*")
        elif t == _DOTSTAR:
            parts.append(".*")
        elif t == _OPTDIR:
            parts.append("(?:.*/)?")
        else:
            parts.append(tok[1].regex())
    return "".join(parts)


def _closure(tokens: list[_Token], states: set[tuple[int, bool]]) -> set[tuple[int, bool]]:
    todo = list(states)
    seen = set(states)
    while todo:
        i, inside = todo.pop()
        if inside or i >= len(tokens):
            continue
        t = tokens[i][0]
        extra = []
        if t in (_STAR, _DOTSTAR):
            extra.append((i + 1, False))
        elif t == _OPTDIR:
            extra += [(i + 1, False), (i, True)]
        for state in extra:
            if state not in seen:
                seen.add(state)
                todo.append(state)
    return seen


def _step(tok: _Token, ch: str) -> int | None:
    """How far one character moves the NFA over ``tok``: 0 stays, 1 advances, None fails."""
    t = tok[0]
    if t == _OPTDIR:
        return None  # entered through the closure's (i, inside=True) state instead
    if t == _DOTSTAR:
        return 0
    if t == _STAR:
        return 0 if ch != "/" else None
    if t == _LIT:
        ok = ch == tok[1]
    elif t == _ANY1:
        ok = ch != "/"
    else:
        ok = tok[1].contains(ch)
    return 1 if ok else None


def _could_match_below(tokens: list[_Token], directory: str) -> bool:
    """Whether the pattern could match some path strictly below ``directory``.

    Runs the pattern as an NFA over ``directory + "/"``; a surviving state that still has
    tokens to match (or sits inside a ``(.*/)?`` group) can be completed by some longer path.
    Over-approximates (it may say yes for a path that is not a valid file name), never under.
    """
    prefix = directory + "/" if directory else ""
    states = _closure(tokens, {(0, False)})
    for ch in prefix:
        nxt: set[tuple[int, bool]] = set()
        for i, inside in states:
            if inside:
                nxt.add((i, True))
                if ch == "/":
                    nxt.add((i + 1, False))
                continue
            if i >= len(tokens):
                continue
            step = _step(tokens[i], ch)
            if step is not None:
                nxt.add((i + step, False))
        states = _closure(tokens, nxt)
        if not states:
            return False
    return any(inside or i < len(tokens) for i, inside in states)


@dataclass(frozen=True)
class _Pattern:
    text: str  # cleaned, without the "!"
    exclusion: bool
    kind: str
    tokens: tuple
    regex: re.Pattern | None
    error: str | None  # upstream only notices this when matching; so do we

    def match(self, path: str) -> bool:
        kind = self.kind
        if kind == "exact":
            return path == self.text
        if kind == "prefix":
            return path.startswith(self.text[:-2])
        if kind == "suffix":
            suffix = self.text[2:]
            return path.endswith(suffix) or (suffix[:1] == "/" and path == suffix[1:])
        return self.regex.fullmatch(path) is not None


def _compile_pattern(text: str, exclusion: bool, original: str) -> _Pattern:
    try:
        tokens, kind = _tokenize(text, double_star=True)
    except _SyntaxError:
        raise IgnoreError(f"invalid ignore pattern {original!r}: syntax error in pattern") from None
    regex = None
    error = None
    reversed_ranges = [f"{lo}-{hi}" for tok in tokens if tok[0] == _CLASS
                       for lo, hi in tok[1].ranges if lo > hi]
    if reversed_ranges:
        # filepath.Match accepts [z-a] (it just never matches); the regexp engine does not.
        error = (f"invalid ignore pattern {original!r}: invalid character class range "
                 f"{reversed_ranges[0]!r}")
    elif kind == "regexp":
        regex = re.compile(_tokens_regex(tokens), re.DOTALL)
    return _Pattern(text, exclusion, kind, tuple(tokens), regex, error)


def compile_glob(pattern: str) -> Callable[[str], bool]:
    """A predicate with Go ``filepath.Match`` semantics (``*``, ``?`` and classes never cross
    '/' except a class that names it; ``\\`` escapes). Raises IgnoreError on a bad pattern."""
    try:
        tokens, _ = _tokenize(pattern, double_star=False)
    except _SyntaxError:
        raise IgnoreError(f"invalid pattern {pattern!r}: syntax error in pattern") from None
    regex = re.compile(_tokens_regex(tokens), re.DOTALL)
    return lambda path: regex.fullmatch(path) is not None


def compile_pattern(pattern: str) -> Callable[[str], bool]:
    """One pattern of .dockerignore syntax (``**`` spans directories), cleaned as
    patternmatcher cleans it, as a predicate on a path itself (not on its parents). Raises
    IgnoreError on a malformed pattern."""
    compiled = _compile_pattern(clean_path(go_trim_space(pattern)), False, pattern)
    if compiled.error:
        raise IgnoreError(compiled.error)
    return compiled.match


# ---------------------------------------------------------------------------------------------
# The matcher


class IgnoreMatcher:
    """A compiled pattern list. Paths are relative to the context root, '/'-separated."""

    def __init__(self, patterns: list[str]):
        compiled = []
        for original in patterns:
            p = go_trim_space(original)
            if not p:
                continue
            # Upstream cleans before looking at "!", so "!a/../b" becomes the pattern "b".
            p = clean_path(p)
            exclusion = p.startswith("!")
            if exclusion:
                if len(p) == 1:
                    raise IgnoreError('illegal exclusion pattern: "!"')
                p = p[1:]
            compiled.append(_compile_pattern(p, exclusion, original))
        self._patterns: tuple[_Pattern, ...] = tuple(compiled)
        self._error = next((p.error for p in compiled if p.error), None)
        self._dir_hits: dict[str, tuple[bool, ...]] = {}

    @property
    def patterns(self) -> list[str]:
        """The compiled patterns, cleaned, exclusions with their leading '!'."""
        return [("!" if p.exclusion else "") + p.text for p in self._patterns]

    @property
    def has_exclusions(self) -> bool:
        return any(p.exclusion for p in self._patterns)

    def __bool__(self) -> bool:
        return bool(self._patterns)

    def _check(self) -> None:
        if self._error:
            raise IgnoreError(self._error)

    def _hits(self, directory: str) -> tuple[bool, ...]:
        """Per pattern: does it match ``directory`` or one of its ancestors? Memoised, since
        every file of a directory asks the same question."""
        cache = self._dir_hits
        hits = cache.get(directory)
        if hits is not None:
            return hits
        chain = [directory]  # this directory and its uncached ancestors, deepest first
        hits = (False,) * len(self._patterns)
        while True:
            parent, sep, _ = chain[-1].rpartition("/")
            if not sep:
                break
            known = cache.get(parent)
            if known is not None:
                hits = known
                break
            chain.append(parent)
        if len(cache) + len(chain) > _DIR_CACHE_LIMIT:
            cache.clear()
        for d in reversed(chain):
            hits = tuple(up or p.match(d) for up, p in zip(hits, self._patterns, strict=True))
            cache[d] = hits
        return hits

    def matches(self, path: str) -> bool:
        """True if ``path`` is excluded from the build context."""
        if not self._patterns:
            return False
        self._check()
        path = clean_path(path)
        if path == ".":
            return False
        parent = posixpath.dirname(path)
        hits = self._hits(parent) if parent else None
        # The last pattern that matches the path or a parent decides (upstream evaluates in
        # order and skips patterns that cannot change the state; that is the same thing).
        for k in range(len(self._patterns) - 1, -1, -1):
            p = self._patterns[k]
            if (hits is not None and hits[k]) or p.match(path):
                return not p.exclusion
        return False

    def may_match_inside(self, dir_path: str) -> bool:
        """For an excluded directory: could an exclusion ('!') pattern re-include anything below
        it? False means a walker may skip the whole subtree."""
        if not self.has_exclusions:
            return False
        self._check()
        directory = clean_path(dir_path)
        if directory in (".", "/"):
            return True
        hits = self._hits(directory)
        last = max((k for k, hit in enumerate(hits) if hit), default=-1)
        if last >= 0 and self._patterns[last].exclusion:
            return True  # the directory itself is not excluded
        # Patterns up to `last` match every descendant through this directory, so only a later
        # exclusion pattern that can match a path below it may flip a descendant back.
        return any(p.exclusion and _could_match_below(list(p.tokens), directory)
                   for p in self._patterns[last + 1:])
