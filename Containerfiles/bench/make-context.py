#!/usr/bin/env python3
"""Write the build context of Containerfiles/bench/Containerfile into DIR.

A source tree as a real project has one: FILES files (default 3,000) in nested
package directories, mostly text of varied size, some executable scripts, a few
incompressible assets and relative symlinks. The same SEED gives the same tree, byte
for byte, so every builder in a benchmark sees identical input.

    python3 Containerfiles/bench/make-context.py DIR [--files 3000] [--seed 1]

Prints the path (relative to DIR) of one ordinary text file, the one a benchmark
edits to make a one-file change.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

WORDS = ("alpha beta gamma delta import return value buffer layer image digest "
         "context build cache store kiln config error path mode owner").split()


def _text(rng: random.Random, size: int) -> bytes:
    lines, n = [], 0
    while n < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
        lines.append(line)
        n += len(line) + 1
    return ("\n".join(lines) + "\n").encode()


def make_context(root: Path, files: int = 3000, seed: int = 1) -> str:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    per_dir = 50
    edit_me = ""
    for i in range(files):
        pkg = root / "src" / f"pkg{i // (per_dir * 10):02d}" / f"mod{(i // per_dir) % 10}"
        pkg.mkdir(parents=True, exist_ok=True)
        roll = rng.random()
        size = int(2 ** rng.uniform(7, 15))  # 128 B .. 32 KiB, log-uniform
        if roll < 0.03:
            path, data, mode = pkg / f"asset{i:04d}.bin", rng.randbytes(size), 0o644
        elif roll < 0.08:
            path, data, mode = pkg / f"tool{i:04d}.sh", b"#!/bin/sh\n" + _text(rng, size), 0o755
        elif roll < 0.10 and i > 0:
            # a relative link to an earlier file of the same directory, or to its parent
            os.symlink("..", pkg / f"up{i:04d}")
            continue
        else:
            path, data, mode = pkg / f"file{i:04d}.txt", _text(rng, size), 0o644
            if not edit_me and i >= files // 2:
                edit_me = str(path.relative_to(root))
        path.write_bytes(data)
        path.chmod(mode)
    return edit_me


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    print(make_context(args.dir, args.files, args.seed))


if __name__ == "__main__":
    main()
