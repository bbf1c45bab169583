"""Containerfile / Dockerfile parser.

Syntax follows BuildKit's ``frontend/dockerfile/parser`` so that ``dump()`` reproduces its
``Node.Dump()`` byte for byte (tests/builder/test_parser_corpus.py). The parser does not expand
variables; quotes and escapes inside arguments are kept for the engine's word expansion.

``Instruction.args`` per instruction (``json`` tells exec form from shell form):

* RUN, CMD, ENTRYPOINT, SHELL: exec form -> the JSON items; shell form -> ``(command,)``,
  the raw rest of the line; nothing -> ``()``.
* ADD, COPY, VOLUME: the JSON items, or the whitespace-separated words with quotes kept.
* FROM, EXPOSE: the whitespace-separated words.
* MAINTAINER, USER, WORKDIR, STOPSIGNAL: ``(rest,)`` or ``()``.
* ARG: the words, each ``name`` or ``name=value`` with quotes kept.
* ENV, LABEL: flat ``(key1, value1, key2, value2, ...)``, values raw (quotes kept);
  ``Instruction.key_values()`` pairs them. ``legacy_form`` is True for ``ENV KEY value words``
  (one pair, the value is the rest of the line); only the dump shows the difference.
* HEALTHCHECK: ``(TYPE, *command)`` such as ``("CMD", "curl -f x")``, ``("CMD", "a", "b")``
  with ``json``, ``("NONE",)``; ``()`` when empty.
* ONBUILD: ``args == ()`` and ``onbuild`` is the wrapped instruction (its ``original`` is the
  trigger text).

``flags`` are the leading ``--name[=value]`` words as BuildKit splits them: quotes and
backslash escapes inside a flag word are removed (``--a="x y"`` -> ``--a=x y``).

Heredoc bodies are stored on RUN/COPY/ADD (and on both an ONBUILD and its trigger);
``Heredoc.content`` already has leading tabs removed for ``<<-``. Bodies are kept byte for
byte otherwise, so a CRLF file yields ``\\r\\n`` inside heredocs, as in BuildKit.

Limits: a physical line may hold at most 65535 bytes (BuildKit's scanner limit, same message),
a logical line (continuations joined) at most 1 MiB, a whole file at most 16 MiB and 250,000
instructions. Real Containerfiles have tens or hundreds; the issue that set these limits asks
that 100,000 ENV lines build in seconds, and the instruction limit keeps what a build holds
per instruction (its history entry, its cache key) far below a GiB. BuildKit has none.

Strict mode (the default) adds what BuildKit checks only later, in its instructions layer:
unknown instructions, ``ONBUILD ONBUILD/FROM/MAINTAINER`` and an empty ONBUILD are errors.
``strict=False`` accepts them like BuildKit's parser (unknown ones dump as ``(name "")``).

Differences from BuildKit, all in corners: flag words and heredoc words are split on
characters, not bytes; ``$`` is not special when looking for heredoc words on a line, and
``RUN <<- EOF`` (blank after ``<<-``) is a heredoc; JSON arrays are decoded by Python (lone
surrogate escapes become U+FFFD, like Go). As in BuildKit, text after a complete JSON array
(``CMD ["a"] b``) is ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import unicodedata
from dataclasses import dataclass

from store.errors import KilnError

MAX_PHYSICAL_LINE = 65535  # bytes, without the newline (Go bufio.MaxScanTokenSize - 1)
MAX_LOGICAL_LINE = 1 << 20  # bytes, continuations joined
MAX_FILE_SIZE = 16 << 20  # bytes
MAX_INSTRUCTIONS = 250_000

DIRECTIVES = ("syntax", "escape", "check")
INSTRUCTIONS = (
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
)
ONBUILD_FORBIDDEN = ("ONBUILD", "FROM", "MAINTAINER")
HEREDOC_INSTRUCTIONS = ("RUN", "COPY", "ADD")
MAX_ONBUILD_DEPTH = 8

# Go unicode.IsSpace: the characters with the Unicode White_Space property.
_GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)
_ASCII_BLANKS = re.compile(r"[\t\v\f\r ]+")
_RE2_SPACE = "\t\n\f\r "  # what \s matches in Go regexps
# BuildKit: ^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$ ; the value part is done by hand
# because the lazy group backtracks quadratically on long runs of blanks.
_DIRECTIVE_KEY = re.compile(r"#[\t\n\f\r ]*([a-zA-Z][a-zA-Z0-9]*)[\t\n\f\r ]*=")
# BuildKit: ^(\d*)<<(-?)\s*([^<]*)$ ; the rest is checked by hand for the same reason.
_HEREDOC_START = re.compile(r"([0-9]*)<<(-?)")
_LEADING_TABS = re.compile(r"^\t+", re.MULTILINE)
_SURROGATE = re.compile("[\ud800-\udfff]")
_BOM = b"\xef\xbb\xbf"


class ParseError(KilnError):
    """A Containerfile cannot be parsed; the message starts with ``<path>:<line>: ``."""

    def __init__(self, path: str, line: int | None, reason: str):
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


class _LineError(Exception):
    """Raised while parsing one logical line; turned into ParseError with its location."""


@dataclass(frozen=True)
class Heredoc:
    name: str
    content: str
    expand: bool
    chomp: bool
    fd: int = 0  # `RUN 3<<EOF` feeds file descriptor 3; 0 means stdin / not given


@dataclass(frozen=True)
class Instruction:
    cmd: str
    line: int
    end_line: int
    flags: tuple[str, ...]
    args: tuple[str, ...]
    json: bool
    original: str
    heredocs: tuple[Heredoc, ...] = ()
    onbuild: Instruction | None = None
    legacy_form: bool = False
    path: str = "Containerfile"

    @property
    def location(self) -> str:
        return f"{self.path}:{self.line}"

    def key_values(self) -> tuple[tuple[str, str], ...]:
        """ENV/LABEL pairs ``(key, raw value)``."""
        return tuple(zip(self.args[::2], self.args[1::2], strict=True))


@dataclass(frozen=True)
class Dockerfile:
    path: str
    instructions: tuple[Instruction, ...]
    directives: dict[str, str]
    escape: str
    warnings: tuple[str, ...] = ()


# ---------------------------------------------------------------- reading the file


def _decode(text: str | bytes, path: str) -> str:
    if isinstance(text, str):
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            line = text.count("\n", 0, e.start) + 1
            raise ParseError(path, line, "text is not valid Unicode (lone surrogate)") from None
    else:
        data = bytes(text)
    if len(data) > MAX_FILE_SIZE:
        raise ParseError(path, None, f"file is larger than {MAX_FILE_SIZE} bytes")
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise ParseError(path, line, "NUL byte in file (a Containerfile must be text)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ParseError(path, line, f"invalid UTF-8 (byte 0x{data[e.start]:02x} at column "
                                     f"{column}); a Containerfile must be UTF-8 text") from None


def _utf8_len(s: str) -> int:
    # len(s) is a lower bound; only encode when the bound alone cannot decide.
    return len(s) if s.isascii() else len(s.encode("utf-8"))


def _split_physical_lines(text: str, path: str) -> list[str]:
    """Lines without their "\\n" (heredoc bodies put it back: every body line had one)."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, 1):
        if len(line) > MAX_PHYSICAL_LINE // 4 and _utf8_len(line) > MAX_PHYSICAL_LINE:
            raise ParseError(path, number, "dockerfile line greater than max allowed size of "
                                           f"{MAX_PHYSICAL_LINE}")
    return lines


class _Directives:
    def __init__(self, path: str):
        self.path = path
        self.done = False
        self.values: dict[str, str] = {}
        self.escape = "\\"

    def feed(self, line: str, number: int) -> None:
        """Look at one physical line (already stripped on the left) while directives may come."""
        if self.done:
            return
        m = _DIRECTIVE_KEY.match(line)
        rest = line[m.end():] if m else ""
        key = m.group(1).lower() if m and rest else None
        if key not in DIRECTIVES:
            self.done = True
            return
        # the regex's lazy (.+?) takes at least one character, even a blank
        value = rest.strip(_RE2_SPACE) or rest[-1]
        if key in self.values:
            raise ParseError(self.path, number, f"only one {key} parser directive can be used")
        if key == "escape" and value not in ("`", "\\"):
            raise ParseError(self.path, number,
                             f"invalid escape token {value!r} does not match ` or \\")
        self.values[key] = value
        if key == "escape":
            self.escape = value

    def trim_continuation(self, line: str) -> tuple[str, bool]:
        """(line without a trailing escape character, whether the line continues)."""
        body = line.rstrip(" \t")
        if not body.endswith(self.escape):
            return line, False
        before = body[:-1]
        if before.endswith(self.escape):  # an escaped escape character is literal
            return line, False
        return before, True


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _is_comment(line: str) -> bool:
    return line.lstrip(_GO_SPACE).startswith("#")


# ---------------------------------------------------------------- one logical line


def split_flags(text: str) -> tuple[list[str], str]:
    """Leading ``--flag`` words of ``text`` (quotes and backslashes removed) and the rest."""
    flags: list[str] = []
    word: list[str] = []
    phase = "space"
    quote = ""
    blank_ok = False
    n = len(text)
    pos = 0
    while pos <= n:
        ch = text[pos] if pos < n else ""
        if phase == "space":
            if pos == n:
                break
            if ch in _GO_SPACE:
                pos += 1
                continue
            if not text.startswith("--", pos):
                return flags, text[pos:]
            phase = "word"
        if pos == n:
            joined = "".join(word)
            if joined != "--" and (blank_ok or joined):
                flags.append(joined)
            break
        if phase == "word":
            if ch in _GO_SPACE:
                joined = "".join(word)
                if joined == "--":
                    return flags, text[pos:]
                if blank_ok or joined:
                    flags.append(joined)
                word, blank_ok, phase = [], False, "space"
            elif ch in "'\"":
                quote, blank_ok, phase = ch, True, "quote"
            elif ch == "\\":
                if pos + 1 < n:
                    pos += 1
                    word.append(text[pos])
            else:
                word.append(ch)
        else:  # inside quotes
            if ch == quote:
                phase = "word"
            elif ch == "\\":
                if pos + 1 < n:
                    pos += 1
                    word.append(text[pos])
                else:
                    phase = "word"
            else:
                word.append(ch)
        pos += 1
    return flags, ""


def _split_command(line: str) -> tuple[str, list[str], str]:
    parts = _ASCII_BLANKS.split(line.strip(_GO_SPACE), maxsplit=1)
    if len(parts) < 2:
        return parts[0], [], ""
    flags, rest = split_flags(parts[1])
    return parts[0], flags, rest.strip(_GO_SPACE)


def split_words(text: str, escape: str = "\\") -> list[str]:
    """BuildKit's parseWords: split on unquoted whitespace, keeping quotes and escapes."""
    words: list[str] = []
    word: list[str] = []
    phase = "space"
    quote = ""
    blank_ok = False
    n = len(text)
    pos = 0
    while pos <= n:
        ch = text[pos] if pos < n else ""
        if phase == "space":
            if pos == n:
                break
            if ch in _GO_SPACE:
                pos += 1
                continue
            phase = "word"
        if pos == n:
            if blank_ok or word:
                words.append("".join(word))
            break
        if phase == "word":
            if ch in _GO_SPACE:
                if blank_ok or word:
                    words.append("".join(word))
                word, blank_ok, phase = [], False, "space"
                pos += 1
                continue
            if ch in "'\"":
                quote, blank_ok, phase = ch, True, "quote"
            elif ch == escape:
                if pos + 1 == n:
                    pos += 1
                    continue  # an escape character at the very end is dropped
                word.append(ch)
                pos += 1
                ch = text[pos]
            word.append(ch)
        else:  # inside quotes
            if ch == quote:
                phase = "word"
            if ch == escape and quote != "'":
                if pos + 1 == n:
                    phase = "word"
                    pos += 1
                    continue
                word.append(ch)
                pos += 1
                ch = text[pos]
            word.append(ch)
        pos += 1
    return words


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


_JSON = json.JSONDecoder(parse_constant=_reject_constant)
_NOT_STRINGS = "when using JSON array syntax, arrays must be comprised of strings only"


def parse_json_array(text: str) -> tuple[str, ...] | None:
    """The exec-form items of ``text``, or None when it is not a JSON array.

    Raises ``ValueError`` for a JSON array holding something other than strings.
    """
    text = text.lstrip(_GO_SPACE)
    if not text.startswith("["):
        return None
    try:
        value, _ = _JSON.raw_decode(text)
    except ValueError:
        return None
    if not all(isinstance(item, str) for item in value):
        raise ValueError(_NOT_STRINGS)
    return tuple(_SURROGATE.sub("\ufffd", item) for item in value)


def _json_or_none(rest: str) -> tuple[str, ...] | None:
    try:
        return parse_json_array(rest)
    except ValueError as e:
        raise _LineError(str(e)) from None


def _args_maybe_json(rest: str) -> tuple[tuple[str, ...], bool]:
    if not rest:
        return (), False
    items = _json_or_none(rest)
    if items is not None:
        return items, True
    return (rest,), False


def _args_maybe_json_list(rest: str) -> tuple[tuple[str, ...], bool]:
    items = _json_or_none(rest)
    if items is not None:
        return items, True
    return _args_blank_separated(rest), False


def _args_blank_separated(rest: str) -> tuple[str, ...]:
    return tuple(_ASCII_BLANKS.split(rest)) if rest else ()


def _args_name_value(rest: str, cmd: str, escape: str) -> tuple[tuple[str, ...], bool]:
    """ENV/LABEL: (flat key/value tuple, legacy `KEY value` form)."""
    words = split_words(rest, escape)
    if not words:
        return (), False
    if "=" not in words[0]:
        parts = _ASCII_BLANKS.split(rest, maxsplit=1)
        if len(parts) < 2:
            raise _LineError(f"{cmd} must have two arguments")
        return (parts[0], parts[1]), True
    flat: list[str] = []
    for word in words:
        if "=" not in word:
            raise _LineError(f"Syntax error - can't find = in {_short(word)!r}. "
                             "Must be of the form: name=value")
        key, _, value = word.partition("=")
        flat += [key, value]
    return tuple(flat), False


def _args_healthcheck(rest: str) -> tuple[tuple[str, ...], bool]:
    sep = 0
    while sep < len(rest) and rest[sep] not in _GO_SPACE:
        sep += 1
    if sep == 0:
        return (), False
    command, is_json = _args_maybe_json(rest[sep:].lstrip(_GO_SPACE))
    return (rest[:sep], *command), is_json


def _instruction_from_line(line: str, number: int, path: str, escape: str, strict: bool,
                           depth: int = 0) -> Instruction:
    word, flag_list, rest = _split_command(line)
    cmd = word.upper()
    flags = tuple(flag_list)
    base = dict(cmd=cmd, line=number, end_line=number, flags=flags, original=line, path=path)
    if cmd not in INSTRUCTIONS:
        if strict:
            import difflib

            hint = difflib.get_close_matches(cmd, INSTRUCTIONS, n=1, cutoff=0.75)
            suffix = f" (did you mean {hint[0]}?)" if hint else ""
            raise _LineError(f"unknown instruction: {_short(word)}{suffix}")
        return Instruction(args=(), json=False, **base)
    if cmd == "ONBUILD":
        if not rest:
            if strict:
                raise _LineError("ONBUILD needs an instruction to run, e.g. ONBUILD RUN make")
            return Instruction(args=(), json=False, **base)
        if depth >= MAX_ONBUILD_DEPTH:
            raise _LineError("ONBUILD nested too deeply")
        inner = _instruction_from_line(rest, number, path, escape, strict, depth + 1)
        if strict and inner.cmd in ONBUILD_FORBIDDEN:
            if inner.cmd == "ONBUILD":
                raise _LineError("chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")
            raise _LineError(f"{inner.cmd} isn't allowed as an ONBUILD trigger")
        return Instruction(args=(), json=False, onbuild=inner, **base)
    legacy = False
    if cmd in ("RUN", "CMD", "ENTRYPOINT", "SHELL"):
        args, is_json = _args_maybe_json(rest)
    elif cmd in ("ADD", "COPY", "VOLUME"):
        args, is_json = _args_maybe_json_list(rest)
    elif cmd in ("FROM", "EXPOSE"):
        args, is_json = _args_blank_separated(rest), False
    elif cmd in ("ENV", "LABEL"):
        (args, legacy), is_json = _args_name_value(rest, cmd, escape), False
    elif cmd == "ARG":
        args, is_json = tuple(split_words(rest, escape)), False
    elif cmd == "HEALTHCHECK":
        args, is_json = _args_healthcheck(rest)
    else:  # MAINTAINER, USER, WORKDIR, STOPSIGNAL
        args, is_json = ((rest,) if rest else ()), False
    return Instruction(args=args, json=is_json, legacy_form=legacy, **base)


# ---------------------------------------------------------------- heredocs


def _lex_words(text: str, raw: bool) -> list[str]:
    """Shell-like word split (quotes, backslash escapes, ``<<`` absorbing following blanks).

    ``raw`` keeps quotes and escape characters in the words. Raises ValueError on an
    unterminated quote.
    """
    words: list[str] = []
    word: list[str] = []
    in_word = False
    n = len(text)
    pos = 0
    while pos < n:
        ch = text[pos]
        if ch == "'":
            end = text.find("'", pos + 1)
            if end < 0:
                raise ValueError("unterminated single quote")
            word.append(text[pos:end + 1] if raw else text[pos + 1:end])
            in_word = True
            pos = end + 1
        elif ch == '"':
            pos += 1
            part = ['"'] if raw else []
            while True:
                if pos >= n:
                    raise ValueError("unterminated double quote")
                c = text[pos]
                if c == '"':
                    break
                if c == "\\":
                    if raw:
                        part.append(c)
                    if pos + 1 < n and text[pos + 1] in '"$\\':
                        pos += 1
                        c = text[pos]
                    elif pos + 1 >= n:
                        pos += 1
                        continue
                part.append(c)
                pos += 1
            if raw:
                part.append('"')
            word.append("".join(part))
            in_word = True
            pos += 1
        elif ch == "<" and text.startswith("<<", pos):
            end = pos + 2
            if text.startswith("-", end):  # `<<- EOF`: BuildKit's lexer misses this one
                end += 1
            while end < n and text[end] in " \t":
                end += 1
            word.append(text[pos:end])
            in_word = True
            pos = end
        elif ch == "\\":
            if raw:
                word.append(ch)
            if pos + 1 < n:
                word.append(text[pos + 1])
            in_word = True
            pos += 2
        elif ch in _GO_SPACE:
            if in_word and word:
                words.append("".join(word))
                word, in_word = [], False
            pos += 1
        else:
            word.append(ch)
            in_word = True
            pos += 1
    if word:
        words.append("".join(word))
    return words


def parse_heredoc_word(word: str) -> Heredoc | None:
    """A heredoc for one shell word like ``<<EOF``, ``3<<-'EOF'``; None if it is not one.

    Raises ValueError for an unterminated quote or an absurd file descriptor.
    """
    m = _HEREDOC_START.match(word)
    rest = word[m.end():].lstrip(_RE2_SPACE) if m else ""
    if not rest or "<" in rest:
        return None
    words = _lex_words(rest, raw=False)
    if len(words) != 1:
        return None
    digits = m.group(1)
    if len(digits) > 9:
        raise ValueError(f"file descriptor {_short(digits, 20)} is too large")
    raw_words = _lex_words(rest, raw=True)
    quotes = words[0].count("'") + words[0].count('"')
    raw_quotes = raw_words[0].count("'") + raw_words[0].count('"')
    return Heredoc(name=words[0], content="", expand=quotes == raw_quotes,
                   chomp=m.group(2) == "-", fd=int(digits or 0))


def heredocs_in_line(line: str) -> tuple[Heredoc, ...]:
    """The heredocs a logical line opens, in order, without their bodies."""
    try:
        words = _lex_words(line, raw=True)
    except ValueError:
        return ()  # BuildKit ignores lines its shell lexer cannot split
    found = []
    for word in words:
        try:
            doc = parse_heredoc_word(word)
        except ValueError as e:
            raise _LineError(f"bad heredoc {_short(word)!r}: {e}") from None
        if doc is not None:
            found.append(doc)
    return tuple(found)


def chomp_heredoc_content(content: str) -> str:
    """Remove the leading tabs of every line (the ``<<-`` form)."""
    return _LEADING_TABS.sub("", content)


def _may_hold_heredoc(inst: Instruction) -> bool:
    target = inst.onbuild if inst.onbuild is not None else inst
    return target.cmd in HEREDOC_INSTRUCTIONS and not target.json


# ---------------------------------------------------------------- the file


def parse(text: str | bytes, path: str = "Containerfile", *, strict: bool = True) -> Dockerfile:
    """Parse a whole Containerfile; raises ParseError naming ``path:line``."""
    path = os.fspath(path)
    lines = _split_physical_lines(_decode(text, path), path)
    directives = _Directives(path)
    instructions: list[Instruction] = []
    warnings: list[str] = []
    total = len(lines)
    i = 0
    while i < total:
        start = i + 1
        first = lines[i].rstrip("\r").lstrip(_GO_SPACE)
        i += 1
        directives.feed(first, start)
        if first.startswith("#"):
            continue  # a comment never continues, even when it ends with the escape character
        piece, more = directives.trim_continuation(first)
        if not more and not piece:
            continue
        pieces = [piece]
        empty_continuation = False
        while more and i < total:
            physical = lines[i].rstrip("\r")
            i += 1
            if _is_comment(physical):
                continue
            if not physical.strip(_GO_SPACE):
                empty_continuation = True
                continue
            piece, more = directives.trim_continuation(physical)
            pieces.append(piece)
        logical = "".join(pieces)
        if not logical.strip(_GO_SPACE):
            continue
        if len(logical) > MAX_LOGICAL_LINE // 4 and _utf8_len(logical) > MAX_LOGICAL_LINE:
            raise ParseError(path, start, f"instruction longer than {MAX_LOGICAL_LINE} bytes")
        if empty_continuation:
            warnings.append(f"{path}:{start}: Empty continuation line found in: {logical} "
                            "(empty continuation lines will become errors in a future release)")
        try:
            inst = _instruction_from_line(logical, start, path, directives.escape, strict)
            docs = heredocs_in_line(logical) if _may_hold_heredoc(inst) and "<<" in logical \
                else ()
        except _LineError as e:
            raise ParseError(path, start, str(e)) from None

        bodies = []
        for doc in docs:
            body: list[str] = []
            terminated = False
            while i < total:
                physical = lines[i]
                i += 1
                candidate = physical.rstrip("\r")
                if doc.chomp:
                    candidate = candidate.lstrip("\t")
                if candidate == doc.name:
                    terminated = True
                    break
                body.append(physical + "\n")
            if not terminated:
                raise ParseError(path, start, f"unterminated heredoc <<{doc.name}: the file ends "
                                              f"before a line reading {doc.name!r}")
            content = "".join(body)
            if doc.chomp:
                content = chomp_heredoc_content(content)
            bodies.append(dataclasses.replace(doc, content=content))

        end = dict(end_line=i, heredocs=tuple(bodies))
        if inst.onbuild is not None:
            end["onbuild"] = dataclasses.replace(inst.onbuild, **end)
        if len(instructions) >= MAX_INSTRUCTIONS:
            raise ParseError(path, start, f"more than {MAX_INSTRUCTIONS} instructions "
                                          "(kiln's limit for one file)")
        instructions.append(dataclasses.replace(inst, **end))

    if not instructions:
        raise ParseError(path, max(total, 1), "file with no instructions")
    return Dockerfile(path=path, instructions=tuple(instructions),
                      directives=dict(directives.values), escape=directives.escape,
                      warnings=tuple(warnings))


def parse_file(path: str | os.PathLike, *, strict: bool = True) -> Dockerfile:
    """Read (at most MAX_FILE_SIZE bytes) and parse a Containerfile."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read(MAX_FILE_SIZE + 1)
    except OSError as e:
        raise ParseError(name, None, f"cannot read: {e.strerror or e}") from None
    return parse(data, name, strict=strict)


# ---------------------------------------------------------------- flags


def parse_flags(inst: Instruction, allowed: dict[str, type]) -> dict[str, object]:
    """Check and convert ``inst.flags``.

    ``allowed`` maps a flag name (``"from"`` or ``"--from"``) to ``str``, ``bool``, ``int`` or
    ``list`` (repeatable, values collected in order). The result has every allowed name,
    without dashes: absent flags are ``None`` (str/int), ``False`` (bool) or ``[]`` (list).
    ``--link`` alone means True; ``--link=false`` is accepted too.
    """
    spec = {name.removeprefix("--"): kind for name, kind in allowed.items()}
    result: dict[str, object] = {}
    for name, kind in spec.items():
        if kind not in (str, bool, int, list):
            raise TypeError(f"unsupported flag type {kind!r} for --{name}")
        result[name] = [] if kind is list else False if kind is bool else None
    seen: set[str] = set()

    def fail(reason: str) -> ParseError:
        return ParseError(inst.path, inst.line, reason)

    for flag in inst.flags:
        name, has_value, value = flag.removeprefix("--").partition("=")
        if not flag.startswith("--") or name not in spec:
            known = ", ".join(f"--{n}" for n in spec) or "none"
            raise fail(f"unknown flag {flag.partition('=')[0]} for {inst.cmd} (allowed: {known})")
        kind = spec[name]
        if kind is not list:
            if name in seen:
                raise fail(f"flag --{name} given more than once for {inst.cmd}")
            seen.add(name)
        if kind is bool:
            if not has_value:
                result[name] = True
            elif value.lower() in ("true", "false"):
                result[name] = value.lower() == "true"
            else:
                raise fail(f"flag --{name} expects true or false, not {value!r}")
            continue
        if not has_value:
            raise fail(f"flag --{name} needs a value: --{name}=<value>")
        if kind is list:
            result[name].append(value)  # type: ignore[union-attr]
        elif kind is int:
            if not re.fullmatch(r"[+-]?[0-9]+", value):
                raise fail(f"flag --{name} expects a whole number, not {value!r}")
            result[name] = int(value)
        else:
            result[name] = value
    return result


# ---------------------------------------------------------------- dump


def go_quote(s: str) -> str:
    """Go's strconv.Quote."""
    out = ['"']
    for ch in s:
        code = ord(ch)
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif ch == " " or (code > 0x7f and unicodedata.category(ch)[0] in "LMNPS") \
                or 0x20 < code < 0x7f:
            out.append(ch)
        elif ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif code < 0x20 or code == 0x7f:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
               "\v": "\\v"}


def _dump_instruction(inst: Instruction) -> str:
    parts = [inst.cmd.lower()]
    if inst.flags:
        parts.append("[" + " ".join(go_quote(f) for f in inst.flags) + "]")
    if inst.onbuild is not None:
        parts.append("(" + _dump_instruction(inst.onbuild) + ")")
    elif inst.cmd in ("ENV", "LABEL"):
        marker = "" if inst.legacy_form else "="
        for key, value in inst.key_values():
            parts += [go_quote(key), go_quote(value), go_quote(marker)]
    elif inst.cmd not in INSTRUCTIONS:
        parts.append('""')  # BuildKit's parseIgnore node
    else:
        parts += [go_quote(a) for a in inst.args]
    return " ".join(parts).strip(_GO_SPACE)


def dump(df: Dockerfile) -> str:
    """BuildKit's ``Node.Dump()`` of the whole file: one ``(instruction ...)`` per line."""
    return "\n".join("(" + _dump_instruction(inst) + ")" for inst in df.instructions)
