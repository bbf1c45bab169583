"""The part of Go's text/template that ``docker ... --format`` users write.

Actions: ``{{.Field.Sub}}``, ``{{.}}``, ``{{json .X}}``, ``{{index .X "key"}}``,
``{{join .X ", "}}``, ``{{upper .X}}``, ``{{lower .X}}``, ``{{title .X}}``, ``{{len .X}}``,
``{{println .X}}``, pipelines (``{{.X | json}}``), ``{{range .X}}...{{end}}``,
``{{if .X}}...{{else}}...{{end}}`` and ``{{-``/``-}}`` trimming. Values print as Go's %v
prints them: lists as ``[a b]``, maps as ``map[k:v]``, a missing field as
``<no value>``. Errors name the template and what is wrong (exit 125 from the CLI).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from store.errors import KilnError

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(\|)|([^\s|]+))')


class TemplateError(KilnError):
    pass


def go_format(value) -> str:
    """A value as Go's fmt %v prints it."""
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(go_format(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{go_format(value[k])}" for k in sorted(value)) + "]"
    return str(value)


def _truthy(value) -> bool:
    return bool(value) and value != 0


def _index(value, *keys):
    for key in keys:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            return None
    return value


FUNCTIONS: dict[str, Callable] = {
    "json": lambda v: json.dumps(v, separators=(",", ":"), ensure_ascii=False),
    "index": _index,
    "join": lambda v, sep: sep.join(go_format(x) for x in (v or [])),
    "upper": lambda v: go_format(v).upper(),
    "lower": lambda v: go_format(v).lower(),
    "title": lambda v: go_format(v).title(),
    "len": lambda v: len(v or []),
    "println": lambda *v: " ".join(go_format(x) for x in v) + "\n",
    "print": lambda *v: "".join(go_format(x) for x in v),
}


class Template:
    def __init__(self, text: str):
        self.text = text
        self._nodes = self._parse()

    def _fail(self, why: str):
        raise TemplateError(f"template {self.text!r}: {why}")

    # -- parsing: a tree of (kind, ...) nodes --------------------------------------------
    def _parse(self) -> list:
        pieces: list = []
        pos = 0
        text = self.text
        for m in _ACTION.finditer(text):
            literal = text[pos:m.start()]
            if m.group(1):
                literal = literal.rstrip()
            pieces.append(("text", literal))
            pieces.append(("action", m.group(2).strip(), bool(m.group(3))))
            pos = m.end()
        pieces.append(("text", text[pos:]))
        # -}} trims the whitespace after it
        for i, p in enumerate(pieces):
            if p[0] == "action" and p[2] and i + 1 < len(pieces):
                pieces[i + 1] = ("text", pieces[i + 1][1].lstrip())
        if "{{" in "".join(p[1] for p in pieces if p[0] == "text"):
            self._fail("an action is not closed with }}")
        nodes, rest = self._block(pieces, 0, top=True)
        return nodes

    def _block(self, pieces: list, i: int, top: bool = False) -> tuple[list, int]:
        nodes: list = []
        while i < len(pieces):
            p = pieces[i]
            if p[0] == "text":
                if p[1]:
                    nodes.append(("text", p[1]))
                i += 1
                continue
            words = p[1].split(None, 1)
            head = words[0] if words else ""
            if head in ("end", "else"):
                if top:
                    self._fail(f"unexpected {{{{{head}}}}}")
                return nodes, i
            if head in ("range", "if"):
                if len(words) < 2:
                    self._fail(f"{{{{{head}}}}} needs a value")
                body, i = self._block(pieces, i + 1)
                otherwise: list = []
                if i < len(pieces) and pieces[i][1].split(None, 1)[0] == "else":
                    otherwise, i = self._block(pieces, i + 1)
                if i >= len(pieces) or pieces[i][1].strip() != "end":
                    self._fail(f"{{{{{head}}}}} without {{{{end}}}}")
                nodes.append((head, self._pipeline(words[1]), body, otherwise))
                i += 1
                continue
            if not head:
                self._fail("an empty action {{}}")
            nodes.append(("value", self._pipeline(p[1])))
            i += 1
        if not top:
            self._fail("a block without {{end}}")
        return nodes, i

    def _pipeline(self, text: str) -> list[list]:
        commands: list[list] = [[]]
        pos = 0
        while pos < len(text.rstrip()):
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                self._fail(f"cannot read {text[pos:]!r}")
            pos = m.end()
            if m.group(1):
                commands[-1].append(("str", json.loads(m.group(1))))
            elif m.group(2):
                commands.append([])
            else:
                word = m.group(3)
                if word.startswith("."):
                    commands[-1].append(("field", [f for f in word[1:].split(".") if f]))
                elif re.fullmatch(r"-?\d+", word):
                    commands[-1].append(("str", int(word)))
                elif word in FUNCTIONS:
                    commands[-1].append(("func", word))
                else:
                    self._fail(f"function {word!r} not defined (kiln knows "
                               f"{', '.join(sorted(FUNCTIONS))})")
        if any(not c for c in commands):
            self._fail(f"missing value in {text!r}")
        return commands

    # -- evaluation ---------------------------------------------------------------------
    def render(self, data) -> str:
        return "".join(self._run(self._nodes, data))

    def _run(self, nodes: list, dot) -> list[str]:
        out: list[str] = []
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "value":
                out.append(go_format(self._eval(node[1], dot)))
            elif kind == "if":
                out += self._run(node[2] if _truthy(self._eval(node[1], dot)) else node[3], dot)
            else:  # range
                items = self._eval(node[1], dot)
                if isinstance(items, dict):
                    items = [items[k] for k in sorted(items)]
                if items:
                    for item in items:
                        out += self._run(node[2], item)
                else:
                    out += self._run(node[3], dot)
        return out

    def _eval(self, commands: list[list], dot):
        value = _NOTHING
        for command in commands:
            args = [self._arg(a, dot) for a in command]
            if value is not _NOTHING:
                args.append(value)
            head = command[0]
            if head[0] == "func":
                try:
                    value = FUNCTIONS[head[1]](*args[1:])
                except TypeError as e:
                    self._fail(f"{head[1]}: {e}")
            elif len(args) == 1:
                value = args[0]
            else:
                self._fail(f"{command!r}: only a function takes arguments")
        return value

    def _arg(self, arg, dot):
        kind, what = arg
        if kind == "str" or kind == "func":
            return what
        value = dot
        for name in what:
            if isinstance(value, dict):
                value = value.get(name)
            else:
                return None
        return value


_NOTHING = object()


def render_rows(fmt: str, rows: list[dict], headers: dict[str, str]) -> str:
    """``--format`` for a list command: a Go template per row; ``table TEMPLATE`` adds a
    header row (the fields' docker names in ``headers``) and aligns tab-separated
    columns, as docker's tabwriter does. A literal \\t or \\n in ``fmt`` is a tab or a
    newline, as docker reads them."""
    table = fmt.startswith("table")
    fmt = fmt.replace("\\t", "\t").replace("\\n", "\n")  # as docker's formatter does
    template = Template(fmt[len("table"):].strip(" ") if table else fmt)
    lines = [template.render(row) for row in rows]
    if not table:
        return "".join(line + "\n" for line in lines)
    header = Template(re.sub(r"\{\{\s*\.(\w+)\s*\}\}",
                             lambda m: headers.get(m.group(1), m.group(1).upper()),
                             template.text)).render({})
    cells = [line.split("\t") for line in [header, *lines]]
    widths: dict[int, int] = {}
    for row in cells:
        for i, c in enumerate(row[:-1]):
            widths[i] = max(widths.get(i, 0), len(c))
    return "".join("   ".join(c.ljust(widths.get(i, 0)) if i < len(row) - 1 else c
                               for i, c in enumerate(row)).rstrip() + "\n" for row in cells)
