"""Dockerfile word expansion: quotes, escapes and ``$VAR`` / ``${VAR<op>word}``.

The rules are BuildKit's shell lexer (``frontend/dockerfile/shell``) with its default options,
and ``tests/builder/test_shell_corpus.py`` replays its upstream test data against this module.
It is not a POSIX shell: there is no command substitution, no ``~``, no field splitting except
in :func:`expand_words`, and ``*``/``?`` only mean something inside ``#`` ``%`` ``/`` patterns.

Choices on inputs BuildKit's test data does not cover. Where they say BuildKit differs, that is
read from its lex.go, not run here:

* A glob pattern accepts the escape character before any character (``\\:`` is ``:``), where
  BuildKit rejects all but ``\\*`` ``\\?`` ``\\\\``. With ``# escape=``` `` the backtick is the
  escape character in patterns too, where BuildKit keeps using ``\\``.
* ``${V//p/r}`` inserts ``r`` literally; BuildKit hands it to Go's regexp template, so a ``$1``
  that reached the replacement would be dropped there.
* ``*`` and ``?`` match newlines too (as in a shell), where Go's ``.`` does not.
* A ``${<op>...}`` with no name at all (``${%x}``, ``${/a/b}``) is an error, not "".
* :func:`expand_words` keeps text written before a ``${V<op>word}`` in the same word; BuildKit
  (since 2024) loses it through a shared buffer, e.g. ``a${X:-b}`` gives ``["b"]`` there.

Limit: an expanded word may hold at most :data:`MAX_WORD` characters (1 MiB of ASCII), where
BuildKit has none. ``ARG B=${A}${A}`` doubles a value per line, so forty such lines ask for a
terabyte; the check runs on the pieces before they are joined (and before a ``${V//p/r}``
builds its result), so such a file fails at the line that crosses the limit, using at most
a few MiB. A caller expanding longer text (a heredoc body) passes its own ``limit``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from store.errors import KilnError

# Instructions whose arguments the builder expands (Dockerfile reference, "Environment
# replacement", plus ARG, whose name and default BuildKit expands too). ONBUILD is not in the set:
# its trigger is stored as written and expanded only when it runs in a child build, as the
# instruction it wraps. RUN, CMD, ENTRYPOINT, SHELL, HEALTHCHECK and MAINTAINER are left to the
# shell at run time. BuildKit also expands some flag values: ADD/COPY --chown and --chmod, ADD
# --checksum, RUN --mount options; that is the engine's concern, one word at a time.
EXPANDED_INSTRUCTIONS: frozenset[str] = frozenset(
    {"ADD", "ARG", "COPY", "ENV", "EXPOSE", "FROM", "LABEL", "STOPSIGNAL", "USER", "VOLUME",
     "WORKDIR"}
)

_SPECIAL_PARAMETERS = frozenset("@*#?-$!0")

MAX_WORD = 1 << 20  # characters in one expanded word

# What expansion reads variables from; None, like a missing key, means unset.
Env = Mapping[str, str | None]


class ExpansionError(KilnError):
    """A word cannot be expanded: bad ``${...}`` syntax, an unterminated quote, or ``${V:?msg}``."""

    def __init__(self, word: str, reason: str):
        super().__init__(f'failed to process "{word}": {reason}')
        self.word = word
        self.reason = reason


@dataclass(frozen=True)
class Expansion:
    """An expanded word and the variable names it looked up, split by whether env had them."""

    value: str
    matched: frozenset[str]
    unmatched: frozenset[str]


def expand_word(word: str, env: Env, *, escape: str = "\\", limit: int = MAX_WORD) -> str:
    """Expand one word, removing quotes and escapes; never splits (BuildKit's ProcessWord).

    A name missing from ``env``, or mapped to None (an ARG with no value), is unset.
    """
    return _Lexer(word, env, escape, limit).expand()


def expand_words(text: str, env: Env, *, escape: str = "\\", limit: int = MAX_WORD
                 ) -> list[str]:
    """Expand and split into words on unquoted, unescaped whitespace (BuildKit's ProcessWords).

    Whitespace that comes out of an unquoted ``$VAR`` splits too. BuildKit uses this only for
    EXPOSE (and heredoc detection); every other instruction expands word by word.
    """
    return _Lexer(text, env, escape, limit).expand_split()


def expand_with_lookups(word: str, env: Env, *, escape: str = "\\", limit: int = MAX_WORD
                        ) -> Expansion:
    """Like :func:`expand_word`, also reporting which names were found and which were not.

    Every name the word mentions counts, even in a branch whose result is discarded
    (``${SET:-$OTHER}`` looks up OTHER), because BuildKit evaluates the word first.
    """
    lexer = _Lexer(word, env, escape, limit)
    value = lexer.expand()
    return Expansion(value, frozenset(lexer.matched), frozenset(lexer.unmatched))


def expand_with_matches(word: str, env: Env, *, escape: str = "\\", limit: int = MAX_WORD
                        ) -> tuple[str, set[str]]:
    """Expand one word; also return the names that were looked up and found in ``env``."""
    result = expand_with_lookups(word, env, escape=escape, limit=limit)
    return result.value, set(result.matched)


def env_from_list(entries: Iterable[str]) -> dict[str, str]:
    """``["K=V", ...]`` (an image config's Env) as a mapping: split at the first ``=``, a bare
    ``K`` is set to "", the last duplicate wins."""
    env: dict[str, str] = {}
    for entry in entries:
        key, _, value = entry.partition("=")
        env[key] = value
    return env


class _Words:
    """Collects the words of :func:`expand_words`, splitting only where told to."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.current: list[str] = []

    def add_raw(self, text: str) -> None:
        if text:  # as in BuildKit, "" alone never makes a word
            self.current.append(text)

    def add_splitting(self, text: str) -> None:
        for ch in text:
            if not _is_space(ch):
                self.current.append(ch)
            elif self.current:
                self.words.append("".join(self.current))
                self.current = []

    def finish(self) -> list[str]:
        if self.current:
            self.words.append("".join(self.current))
            self.current = []
        return self.words


@functools.cache
def _special_finder(escape: str, stop: str | None) -> re.Pattern[str]:
    return re.compile("[" + re.escape("'\"$<" + escape + (stop or "")) + "]")


def _is_space(ch: str) -> bool:
    # Go's unicode.IsSpace; Python's isspace() also counts the separators U+001C..U+001F.
    return ch.isspace() and not "\x1c" <= ch <= "\x1f"


def _is_name_char(ch: str) -> bool:
    # Go's unicode.IsLetter / IsDigit: categories L* and Nd.
    return ch == "_" or ch.isalpha() or ch.isdecimal()


class _TooLong(Exception):
    """A result would pass the lexer's limit (raised before it is built)."""


class _Lexer:
    def __init__(self, text: str, env: Env, escape: str, limit: int = MAX_WORD):
        if escape not in ("\\", "`"):
            raise ValueError(f"escape must be '\\\\' or '`', not {escape!r}")
        self.text = text
        self.env = env
        self.escape = escape
        self.limit = limit
        self.pos = 0
        self.matched: set[str] = set()
        self.unmatched: set[str] = set()

    def expand(self) -> str:
        return self._guarded(lambda: self._scan(None, raw_escapes=False, words=None))

    def expand_split(self) -> list[str]:
        words = _Words()
        self._guarded(lambda: self._scan(None, raw_escapes=False, words=words))
        return words.finish()

    def _guarded(self, run):
        try:
            return run()
        except RecursionError:
            raise self._error("${...} nested too deeply") from None
        except _TooLong:
            raise self._error(f"the expanded word would be longer than {self.limit} "
                              "characters (kiln's limit; is a variable doubling itself?)"
                              ) from None

    def _error(self, reason: str) -> ExpansionError:
        shown = self.text if len(self.text) <= 200 else self.text[:200] + "..."
        return ExpansionError(shown, reason)

    def _scan(self, stop: str | None, *, raw_escapes: bool, words: _Words | None) -> str:
        """Read up to ``stop`` (consumed) or the end; ``raw_escapes`` keeps escape characters,
        as ``#``/``%``/``/`` patterns need them."""
        text, n, escape, limit = self.text, len(self.text), self.escape, self.limit
        out: list[str] = []
        size = 0  # of the pieces in out: checked before a piece that is not text is kept
        while self.pos < n:
            ch = text[self.pos]
            if ch == stop:
                self.pos += 1
                return "".join(out)
            if ch == "'" or ch == '"':
                piece = self._single_quoted() if ch == "'" else self._double_quoted(raw_escapes)
                size += len(piece)
                if size > limit:
                    raise _TooLong
                out.append(piece)
                if words is not None:
                    words.add_raw(piece)
            elif ch == "$":
                piece = self._dollar()
                size += len(piece)
                if size > limit:
                    raise _TooLong
                out.append(piece)
                if words is not None:
                    words.add_splitting(piece)
            elif ch == escape:
                self.pos += 1
                if self.pos >= n:  # a lone trailing escape is dropped
                    if raw_escapes:
                        out.append(ch)
                    break
                piece = text[self.pos - 1 : self.pos + 1] if raw_escapes else text[self.pos]
                self.pos += 1
                out.append(piece)
                if words is not None:
                    words.add_raw(piece)
            elif ch == "<" and text.startswith("<", self.pos + 1):
                # A heredoc marker keeps the blanks after it: "<< EOF" stays one word.
                end = self.pos + 2
                while end < n and text[end] in " \t":
                    end += 1
                piece = text[self.pos : end]
                self.pos = end
                out.append(piece)
                if words is not None:
                    words.add_raw(piece)
            else:
                end = self._plain_run_end(self.pos + 1, stop)
                piece = text[self.pos : end]
                self.pos = end
                size += len(piece)
                if size > limit:
                    raise _TooLong
                out.append(piece)
                if words is not None:
                    words.add_splitting(piece)
        if stop is not None:
            raise self._error(f"missing '{stop}'")
        return "".join(out)

    def _plain_run_end(self, pos: int, stop: str | None) -> int:
        """End of the run of characters with no meaning to :meth:`_scan`."""
        found = _special_finder(self.escape, stop).search(self.text, pos)
        return len(self.text) if found is None else found.start()

    def _single_quoted(self) -> str:
        start = self.pos + 1
        end = self.text.find("'", start)
        if end < 0:
            raise self._error("unterminated single quote")
        self.pos = end + 1
        return self.text[start:end]

    def _double_quoted(self, raw_escapes: bool) -> str:
        """Inside "...": ``$`` expands; the escape character escapes only ``"``, ``$`` and
        itself, and stays as written before anything else."""
        text, n, escape = self.text, len(self.text), self.escape
        out: list[str] = []
        expanded = 0  # characters from $ pieces; the others are at most the text's length
        self.pos += 1
        while True:
            if self.pos >= n:
                raise self._error("unterminated double quote")
            ch = text[self.pos]
            if ch == '"':
                self.pos += 1
                return "".join(out)
            if ch == "$":
                piece = self._dollar()
                expanded += len(piece)
                if expanded + len(out) > self.limit:
                    raise _TooLong
                out.append(piece)
                continue
            self.pos += 1
            if ch == escape and self.pos < n and text[self.pos] in ('"', "$", escape):
                if raw_escapes:
                    out.append(ch)
                ch = text[self.pos]
                self.pos += 1
            out.append(ch)

    def _name(self) -> str:
        """A variable name at pos: letters/digits/_ not starting with a digit, a run of digits
        (positional), or one special parameter character. "" when there is none."""
        text, n, start = self.text, len(self.text), self.pos
        if start >= n:
            return ""
        ch = text[start]
        end = start + 1
        if ch.isdecimal():
            while end < n and text[end].isdecimal():
                end += 1
        elif ch in _SPECIAL_PARAMETERS:
            pass
        elif _is_name_char(ch):
            while end < n and _is_name_char(text[end]):
                end += 1
        else:
            return ""
        self.pos = end
        return text[start:end]

    def _lookup(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None:
            self.unmatched.add(name)
        else:
            self.matched.add(name)
        return value

    def _dollar(self) -> str:
        self.pos += 1
        if self.text.startswith("{", self.pos):
            self.pos += 1
            return self._braced()
        name = self._name()
        if not name:
            return "$"
        value = self._lookup(name)
        return "" if value is None else value

    def _next_char(self) -> str:
        if self.pos >= len(self.text):
            raise self._error("missing '}'")
        ch = self.text[self.pos]
        self.pos += 1
        return ch

    def _braced(self) -> str:
        """After ``${``: a name, then ``}`` or an operator, its word(s) and ``}``."""
        if self.pos < len(self.text) and self.text[self.pos] in "{}:":
            raise self._error("bad substitution")
        name = self._name()
        op = self._next_char()
        if op == "}":  # name is not empty: "${}" was refused above
            value = self._lookup(name)
            return "" if value is None else value
        if not name:
            raise self._error(f"bad substitution: no variable name before '{op}'")
        null_is_unset = op == ":"
        if null_is_unset:
            op = self._next_char()
            if op not in "-+?":
                raise self._error(f"unsupported modifier (:{op}) in substitution")
        if op in "-+?":
            word = self._scan("}", raw_escapes=False, words=None)
            value = self._lookup(name)
            return self._apply_default(name, op, word, value, null_is_unset)
        if op in "#%":
            pattern = self._scan("}", raw_escapes=True, words=None)
            value = self._lookup(name) or ""
            # BuildKit checks for the doubled operator after the word is expanded.
            longest = pattern.startswith(op)
            glob = _Glob.parse(pattern[1:] if longest else pattern, self.escape)
            if op == "#":
                return value[glob.prefix_end(value, longest) :]
            return value[: glob.suffix_start(value, longest)]
        if op == "/":
            replace_all = self.text.startswith("/", self.pos)
            if replace_all:
                self.pos += 1
            try:
                pattern = self._scan("/", raw_escapes=True, words=None)
            except ExpansionError as err:
                if self.pos >= len(self.text):
                    raise self._error("missing '/' in ${name/pattern/replacement}") from err
                raise
            replacement = self._scan("}", raw_escapes=True, words=None)
            value = self._lookup(name) or ""
            return _Glob.parse(pattern, self.escape).replace(value, replacement, replace_all,
                                                             self.limit)
        raise self._error(f"unsupported modifier ({op}) in substitution")

    def _apply_default(
        self, name: str, op: str, word: str, value: str | None, null_is_unset: bool
    ) -> str:
        missing = value is None or (null_is_unset and value == "")
        if op == "-":
            return word if missing else value
        if op == "+":
            return "" if missing else word
        if value is None:
            raise self._error(f"{name}: {word or 'is not allowed to be unset'}")
        if missing:
            raise self._error(f"{name}: {word or 'is not allowed to be empty'}")
        return value


class _Segment:
    """A fixed-length run of a glob between two ``*``: literal characters and ``?`` (None)."""

    def __init__(self, items: tuple[str | None, ...]):
        self.items = items
        self.length = len(items)
        self.literal: str | None = None
        if None in items:
            body = "".join("." if item is None else re.escape(item) for item in items)
            self.regex = re.compile(body, re.DOTALL)
            # Greedy ".*" backs off one position at a time: the last occurrence in O(n*m).
            self.last_regex = re.compile(f".*({body})", re.DOTALL)
        else:
            self.literal = "".join(items)  # type: ignore[arg-type]

    def matches_at(self, value: str, pos: int) -> bool:
        if self.literal is not None:
            return value.startswith(self.literal, pos)
        return self.regex.match(value, pos) is not None

    def find(self, value: str, pos: int) -> int:
        """First start >= pos, or -1."""
        if self.literal is not None:
            return value.find(self.literal, pos)
        found = self.regex.search(value, pos)
        return -1 if found is None else found.start()

    def find_last(self, value: str, pos: int) -> int:
        """Last start >= pos, or -1."""
        if self.literal is not None:
            return value.rfind(self.literal, pos)
        found = self.last_regex.match(value, pos)
        return -1 if found is None else found.start(1)


class _Glob:
    """A shell pattern (``*``, ``?``, escapes; ``[`` is literal, as in BuildKit), matched without
    backtracking: the pattern is cut at each ``*`` into fixed-length segments, and each segment
    is placed by a plain search. The shortest match places every segment as early as possible;
    the longest places the last one as late as possible. Linear in the value for a fixed
    pattern, so ``${V%%*a*b*c*d}`` on a long value cannot blow up."""

    def __init__(self, segments: list[_Segment]):
        self.segments = segments

    @classmethod
    def parse(cls, pattern: str, escape: str) -> _Glob:
        parts: list[list[str | None]] = [[]]
        i, n = 0, len(pattern)
        while i < n:
            ch = pattern[i]
            i += 1
            if ch == "*":
                parts.append([])
            elif ch == "?":
                parts[-1].append(None)
            elif ch == escape and i < n:
                parts[-1].append(pattern[i])
                i += 1
            else:
                parts[-1].append(ch)
        return cls([_Segment(tuple(part)) for part in parts])

    def reversed(self) -> _Glob:
        """The pattern read backwards, to match suffixes as prefixes of the reversed value."""
        return _Glob([_Segment(segment.items[::-1]) for segment in reversed(self.segments)])
    def _match_end(self, value: str, start: int, longest: bool) -> int | None:
        """End of the shortest/longest match that starts exactly at ``start``."""
        first, *rest = self.segments
        if not first.matches_at(value, start):
            return None
        pos = start + first.length
        if not rest:
            return pos
        *middle, last = rest
        for segment in middle:
            found = segment.find(value, pos)
            if found < 0:
                return None
            pos = found + segment.length
        found = last.find_last(value, pos) if longest else last.find(value, pos)
        return None if found < 0 else found + last.length

    def prefix_end(self, value: str, longest: bool) -> int:
        """How much ``${V#p}`` / ``${V##p}`` removes; 0 when the pattern does not match."""
        end = self._match_end(value, 0, longest)
        return 0 if end is None else end

    def suffix_start(self, value: str, longest: bool) -> int:
        """Where ``${V%p}`` / ``${V%%p}`` cuts; len(value) when the pattern does not match."""
        end = self.reversed()._match_end(value[::-1], 0, longest)
        return len(value) - (0 if end is None else end)

    def _search(self, value: str, pos: int) -> tuple[int, int] | None:
        """Leftmost match at or after ``pos``, longest at that start (Go's leftmost-first with
        greedy ``*``). A later start never helps when the earliest candidate fails."""
        first = self.segments[0]
        start = pos if first.length == 0 else first.find(value, pos)
        if start < 0:
            return None
        end = self._match_end(value, start, longest=True)
        return None if end is None else (start, end)

    def replace(self, value: str, replacement: str, replace_all: bool,
                limit: int = MAX_WORD) -> str:
        """Raises _TooLong, before building it, for a result that grows past ``limit``."""
        grows = len(replacement)
        if len(self.segments) == 1:
            only = self.segments[0]
            if only.length == 0:  # the empty pattern matches before every character
                count = len(value) + 1 if replace_all else 1
            elif grows <= only.length:
                count = 0  # the result is no longer than the value
            elif only.literal is not None:
                count = value.count(only.literal) if replace_all else int(only.literal in value)
            elif replace_all:
                count = sum(1 for _ in only.regex.finditer(value))
            else:
                count = int(only.regex.search(value) is not None)
            if count and len(value) + count * (grows - only.length) > limit:
                raise _TooLong
            if only.length == 0:
                return replacement.join(["", *value, ""]) if replace_all else replacement + value
            if only.literal is not None:
                return value.replace(only.literal, replacement, -1 if replace_all else 1)
            return only.regex.sub(lambda _: replacement, value, count=0 if replace_all else 1)
        if not replace_all:
            found = self._search(value, 0)
            if found is None:
                return value
            if len(value) - (found[1] - found[0]) + grows > limit:
                raise _TooLong
            return value[: found[0]] + replacement + value[found[1] :]
        # Go's ReplaceAll: an empty match right after a match is not replaced, and the search
        # moves on by at least one character. With a "*" in the pattern each match ends at the
        # last possible place, so this loop runs at most a few times.
        out: list[str] = []
        size = last_end = search = 0
        while search <= len(value):
            found = self._search(value, search)
            if found is None:
                break
            start, end = found
            out.append(value[last_end:start])
            size += start - last_end
            if end > last_end or start == 0:
                size += grows
                if size > limit:
                    raise _TooLong
                out.append(replacement)
            last_end = end
            search = max(search + 1, end)
        out.append(value[last_end:])
        return "".join(out)
