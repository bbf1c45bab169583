"""COPY/ADD --chmod: an octal mode, or a symbolic one as BuildKit takes it.

BuildKit (Dockerfile frontend convert_copy.go) first tries the value as octal (at most
07777); anything else goes to github.com/tonistiigi/dchapes-mode, a port of BSD's
setmode(3), and is applied by its copier to each copied file's own mode
(``Set.Apply(fi.Mode())``). The grammar, as setmode(3) and chmod(1) on BSD:

    mode   := clause [',' clause]...
    clause := [who...] action [action...]
    who    := 'u' | 'g' | 'o' | 'a'
    action := op [perm... | 'u' | 'g' | 'o']
    op     := '+' | '-' | '='
    perm   := 'r' | 'w' | 'x' | 'X' | 's' | 't'

``X`` sets execute where a directory is, or where the file already has an execute bit, and
only with ``+`` (BSD ignores it after ``-`` and ``=``); ``u``/``g``/``o`` after an op copy
that class's bits (``go=u-w``); ``s`` on "other" alone and ``t`` on "other" alone do
nothing. A clause without a ``who`` is masked by the umask: BuildKit's copy uses its
daemon's, kiln uses Docker's daemon's, 022 (so ``+w`` adds only u+w).

The directories a copy creates for its destination take an octal --chmod's mode (BuildKit
since fsutil#228, Docker 28.1); a symbolic --chmod leaves them 0755.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from store.errors import KilnError

DOCKER_UMASK = 0o022
_SUID, _SGID, _STICKY = 0o4000, 0o2000, 0o1000
_STANDARD = _SUID | _SGID | 0o777  # what a/u/g/o can touch (not the sticky bit)
_WHO = {"a": _STANDARD, "u": _SUID | 0o700, "g": _SGID | 0o070, "o": 0o007}
_PERMS = {"r": 0o444, "w": 0o222, "x": 0o111}
# a copy command's flags: which classes it copies into, whether it clears and/or sets
_TO_U, _TO_G, _TO_O, _CLEAR, _SET = 1, 2, 4, 8, 16
_OCTAL = re.compile(r"[0-7]+")


class ChmodError(KilnError):
    pass


@dataclass(frozen=True)
class Chmod:
    """A parsed --chmod: ``octal`` for a numeric one, else the setmode(3) commands."""

    text: str
    octal: int | None = None
    commands: tuple[tuple[str, int, int], ...] = ()  # (op, flags, bits)

    def apply(self, mode: int, is_dir: bool) -> int:
        """The mode a copied file or directory whose own mode is ``mode`` gets."""
        if self.octal is not None:
            return self.octal
        old = new = mode & 0o7777
        for op, flags, bits in self.commands:
            if op == "+":
                new |= bits
            elif op == "-":
                new &= ~bits
            elif op == "X":
                if is_dir or old & 0o111:
                    new |= bits
            else:  # copy the u, g or o bits (as they are now) into the classes in flags
                value = (new >> {"u": 6, "g": 3, "o": 0}[op]) & 0o7
                for flag, shift in ((_TO_U, 6), (_TO_G, 3), (_TO_O, 0)):
                    if not flags & flag:
                        continue
                    if flags & _CLEAR:
                        new &= ~(((0o7 if flags & _SET else value) << shift) & bits)
                    if flags & _SET:
                        new |= (value << shift) & bits
        return new & 0o7777

    @property
    def created_dir_mode(self) -> int:
        """The mode of a directory the copy makes for its destination."""
        return self.octal & 0o777 if self.octal is not None else 0o755


def parse_chmod(text: str, umask: int = DOCKER_UMASK) -> Chmod:
    """``text`` as an octal mode (at most 07777) or a symbolic one; ChmodError says why not."""
    if _OCTAL.fullmatch(text):
        value = int(text, 8)
        if value > 0o7777:
            raise ChmodError(f"the octal mode {text} is above 07777")
        return Chmod(text, octal=value)
    if text[:1].isdigit():
        raise ChmodError("an octal mode has only the digits 0-7")
    return Chmod(text, commands=tuple(_Symbolic(text, umask).commands()))


class _Symbolic:
    """setmode(3)'s parser: the clauses of ``text`` as a list of (op, flags, bits)."""

    def __init__(self, text: str, umask: int):
        self.text = text
        self.i = 0
        self.mask = ~umask & 0o7777
        self.out: list[tuple[str, int, int]] = []

    def fail(self, what: str) -> ChmodError:
        return ChmodError(f"{what} at character {self.i + 1} (a symbolic mode is clauses such "
                          "as u+x,g-w,o=r: who [ugoa], then +, - or =, then rwxXst or one of "
                          "u, g, o)")

    def peek(self) -> str:
        return self.text[self.i] if self.i < len(self.text) else ""

    def commands(self) -> list[tuple[str, int, int]]:
        if not self.text:
            raise self.fail("empty mode")
        while True:  # one clause
            who = 0
            while self.peek() in _WHO and self.peek():
                who |= _WHO[self.peek()]
                self.i += 1
            while True:  # one action of the clause
                op = self.peek()
                if op not in ("+", "-", "=") or not op:
                    raise self.fail(f"expected +, - or = but found {op!r}" if op else
                                    "expected +, - or = but the mode ends")
                self.i += 1
                who = self.action(op, who & ~_STICKY)
                if not self.peek():
                    return self.out
                if self.peek() == ",":
                    self.i += 1
                    if not self.peek():
                        raise self.fail("a clause must follow ','")
                    break

    def action(self, op: str, who: int) -> int:
        perm = perm_x = 0
        equal_done = False
        while True:
            c = self.peek()
            if c in _PERMS and c:
                perm |= _PERMS[c]
            elif c == "s":
                if not who or who & ~0o007:  # "o" alone has no set-id bit
                    perm |= _SUID | _SGID
            elif c == "t":
                if not who or who & ~0o007:
                    who |= _STICKY
                    perm |= _STICKY
            elif c == "X":
                if op == "+":
                    perm_x = 0o111
            elif c in ("u", "g", "o"):
                if perm:
                    self.add(op, who, perm)
                    perm = 0
                if op == "=":
                    equal_done = True
                if perm_x:
                    self.add("X", who, perm_x)
                    perm_x = 0
                self.add_copy(c, who, op)
            else:
                if perm or (op == "=" and not equal_done):
                    self.add(op, who, perm)
                if perm_x:
                    self.add("X", who, perm_x)
                return who
            self.i += 1

    def add(self, op: str, who: int, perm: int) -> None:
        if op == "=":  # clear what the clause covers, then set
            self.out.append(("-", 0, who or _STANDARD))
            op = "+"
        self.out.append((op, 0, (who if who else self.mask) & perm))

    def add_copy(self, source: str, who: int, op: str) -> None:
        flags = {"+": _SET, "-": _CLEAR, "=": _SET | _CLEAR}[op]
        if who:
            flags |= (_TO_U if who & 0o400 else 0) | (_TO_G if who & 0o040 else 0) \
                | (_TO_O if who & 0o004 else 0)
            bits = ~0
        else:
            flags |= _TO_U | _TO_G | _TO_O
            bits = self.mask
        self.out.append((source, flags, bits))
