"""Generate runtime/syscall_table.py: syscall name -> number for x86_64 and aarch64.

    python tests/tools/gen_syscall_table.py [--include /usr/include] [--output PATH]

x86_64 numbers come from <asm/unistd_64.h> (plain ``#define __NR_x N`` lines).
aarch64 has no header of its own in an x86_64 sysroot: arm64's uapi
<asm/unistd.h> is only a list of ``__ARCH_WANT_*`` switches followed by
``#include <asm-generic/unistd.h>``, so this script evaluates the generic header
with exactly those switches, ``__BITS_PER_LONG == 64`` and no
``__SYSCALL_COMPAT`` (which is what turns ``__NR3264_fstat`` into ``fstat``,
``__NR3264_mmap`` into ``mmap`` and so on).

Syscalls added to Linux after the installed headers are appended from
NEWER_THAN_HEADERS (numbers from the kernel's syscall tables); only names the
headers lack are taken from there, and a clash with a header number is an error.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path

# arch/arm64/include/uapi/asm/unistd.h (Linux 6.x)
ARM64_WANTS = (
    "__ARCH_WANT_RENAMEAT",
    "__ARCH_WANT_NEW_STAT",
    "__ARCH_WANT_SET_GET_RLIMIT",
    "__ARCH_WANT_TIME32_SYSCALLS",
    "__ARCH_WANT_SYS_CLONE3",
    "__ARCH_WANT_MEMFD_SECRET",
)

# Since Linux 5.1 (424) new syscalls share one number on every architecture
# but alpha; uretprobe is x86_64 only.  (kernel version that added each)
_COMMON_NEW = {
    "cachestat": 451,  # 6.5
    "fchmodat2": 452,  # 6.6
    "map_shadow_stack": 453,  # 6.6
    "futex_wake": 454,  # 6.7
    "futex_wait": 455,  # 6.7
    "futex_requeue": 456,  # 6.7
    "statmount": 457,  # 6.8
    "listmount": 458,  # 6.8
    "lsm_get_self_attr": 459,  # 6.8
    "lsm_set_self_attr": 460,  # 6.8
    "lsm_list_modules": 461,  # 6.8
    "mseal": 462,  # 6.10
    "setxattrat": 463,  # 6.13
    "getxattrat": 464,  # 6.13
    "listxattrat": 465,  # 6.13
    "removexattrat": 466,  # 6.13
    "open_tree_attr": 467,  # 6.15
    "file_getattr": 468,  # 6.17
    "file_setattr": 469,  # 6.17
}
NEWER_THAN_HEADERS = {
    "x86_64": {**_COMMON_NEW, "uretprobe": 335},  # uretprobe: 6.11
    "aarch64": dict(_COMMON_NEW),
}

NOT_SYSCALLS = {"syscalls", "arch_specific_syscall"}


class Preprocessor:
    """Just enough of cpp for the unistd headers: #define, #undef, #if/#ifdef/#ifndef/#else."""

    def __init__(self, defines: dict[str, str]):
        self.macros = dict(defines)

    def run(self, text: str) -> None:
        text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S).replace("\\\n", " ")
        stack: list[tuple[bool, bool]] = []  # (this branch active, some branch taken)
        for raw in text.splitlines():
            line = raw.strip()
            if not line.startswith("#"):
                continue
            directive, _, rest = line[1:].strip().partition(" ")
            rest = rest.strip()
            active = all(a for a, _ in stack)
            if directive in ("if", "ifdef", "ifndef"):
                if directive == "ifdef":
                    cond = rest in self.macros
                elif directive == "ifndef":
                    cond = rest not in self.macros
                else:
                    cond = bool(self.evaluate(rest)) if active else False
                stack.append((cond, cond))
            elif directive == "else":
                _, taken = stack.pop()
                stack.append((not taken, True))
            elif directive == "endif":
                stack.pop()
            elif not active:
                continue
            elif directive == "define":
                m = re.match(r"([A-Za-z_]\w*)(\([^)]*\))?\s*(.*)", rest)
                if m and not m.group(2):
                    self.macros[m.group(1)] = m.group(3).strip()
            elif directive == "undef":
                self.macros.pop(rest, None)
            elif directive == "include":
                continue  # the arch headers' includes carry no syscall numbers we need
            else:
                raise ValueError(f"unsupported directive: {line}")
        if stack:
            raise ValueError("unbalanced #if/#endif")

    def value(self, name: str, depth: int = 0) -> int | None:
        text = self.macros.get(name)
        if text is None or depth > 10:
            return None
        if re.fullmatch(r"\d+", text):
            return int(text)
        if re.fullmatch(r"[A-Za-z_]\w*", text):
            return self.value(text, depth + 1)
        m = re.fullmatch(r"\(?\s*([A-Za-z_]\w*)\s*\+\s*(\d+)\s*\)?", text)
        if m:
            base = self.value(m.group(1), depth + 1)
            return None if base is None else base + int(m.group(2))
        return None

    def evaluate(self, expr: str) -> int:
        tokens = re.findall(r"defined|\|\||&&|==|!=|[()!]|\d+|[A-Za-z_]\w*", expr)
        pos = 0

        def peek() -> str | None:
            return tokens[pos] if pos < len(tokens) else None

        def take() -> str:
            nonlocal pos
            pos += 1
            return tokens[pos - 1]

        def primary() -> int:
            tok = take()
            if tok == "!":
                return int(not primary())
            if tok == "(":
                v = or_expr()
                if take() != ")":
                    raise ValueError(f"bad expression: {expr}")
                return v
            if tok == "defined":
                paren = peek() == "("
                if paren:
                    take()
                name = take()
                if paren:
                    take()
                return int(name in self.macros)
            if tok.isdigit():
                return int(tok)
            v = self.value(tok)
            return v if v is not None else 0

        def comparison() -> int:
            left = primary()
            while peek() in ("==", "!="):
                op = take()
                right = primary()
                left = int(left == right) if op == "==" else int(left != right)
            return left

        def and_expr() -> int:
            v = comparison()
            while peek() == "&&":
                take()
                v = int(comparison() and v)
            return v

        def or_expr() -> int:
            v = and_expr()
            while peek() == "||":
                take()
                v = int(and_expr() or v)
            return v

        result = or_expr()
        if pos != len(tokens):
            raise ValueError(f"bad expression: {expr}")
        return result

    def syscalls(self) -> dict[str, int]:
        table = {}
        for name in self.macros:
            if not name.startswith("__NR_"):
                continue
            short = name[len("__NR_"):]
            number = self.value(name)
            if short in NOT_SYSCALLS or number is None:
                continue
            table[short] = number
        return table


def read_table(header: Path, defines: dict[str, str]) -> dict[str, int]:
    pp = Preprocessor(defines)
    pp.run(header.read_text())
    return pp.syscalls()


def add_newer(arch: str, table: dict[str, int]) -> list[str]:
    added = []
    numbers = {nr: name for name, nr in table.items()}
    for name, nr in NEWER_THAN_HEADERS[arch].items():
        if name in table:
            if table[name] != nr:
                raise SystemExit(f"{arch}: {name} is {table[name]} in the headers, not {nr}")
            continue
        if nr in numbers:
            raise SystemExit(f"{arch}: {name}={nr} clashes with {numbers[nr]} from the headers")
        table[name] = nr
        added.append(name)
    return added


def headers_version(include: Path) -> str:
    text = (include / "linux" / "version.h").read_text()
    parts = [re.search(rf"LINUX_VERSION_{k}\s+(\d+)", text) for k in
             ("MAJOR", "PATCHLEVEL", "SUBLEVEL")]
    if all(parts):
        return ".".join(p.group(1) for p in parts)  # type: ignore[union-attr]
    code = int(re.search(r"LINUX_VERSION_CODE\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    return f"{code >> 16}.{(code >> 8) & 255}.{code & 255}"


def render(include: Path) -> str:
    x86_header = include / "x86_64-linux-gnu" / "asm" / "unistd_64.h"
    if not x86_header.exists():
        x86_header = include / "asm" / "unistd_64.h"
    generic_header = include / "asm-generic" / "unistd.h"
    x86 = read_table(x86_header, {})
    arm = read_table(generic_header, {"__BITS_PER_LONG": "64", **dict.fromkeys(ARM64_WANTS, "")})
    added = {"x86_64": add_newer("x86_64", x86), "aarch64": add_newer("aarch64", arm)}
    version = headers_version(include)

    def literal(name: str, table: dict[str, int]) -> str:
        rows = [f"    {k!r}: {v}," for k, v in sorted(table.items(), key=lambda kv: kv[1])]
        return f"{name}: dict[str, int] = {{\n" + "\n".join(rows) + "\n}\n"

    def newer(arch: str) -> str:
        text = f"  {arch}: " + (", ".join(added[arch]) or "none")
        return "\n".join(textwrap.wrap(text, 96, subsequent_indent="    "))

    return (
        '"""Syscall numbers by name for the architectures kiln runs on.\n\n'
        "GENERATED by tests/tools/gen_syscall_table.py -- do not edit by hand.\n\n"
        f"Source: Linux {version} uapi headers ({x86_header.relative_to(include)} for x86_64;\n"
        f"{generic_header.relative_to(include)} evaluated with arm64's __ARCH_WANT_* switches\n"
        "for aarch64), plus syscalls added to Linux after those headers:\n"
        f"{newer('x86_64')}\n"
        f"{newer('aarch64')}\n"
        '"""\n\n'
        f"HEADERS_VERSION = {version!r}\n\n"
        + literal("X86_64", x86) + "\n" + literal("AARCH64", arm) + "\n"
        + 'SYSCALLS: dict[str, dict[str, int]] = {"x86_64": X86_64, "aarch64": AARCH64}\n'
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--include", type=Path, default=Path("/usr/include"))
    project = Path(__file__).resolve().parents[2]
    parser.add_argument("--output", type=Path, default=project / "runtime" / "syscall_table.py")
    args = parser.parse_args(argv)
    args.output.write_text(render(args.include))
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
