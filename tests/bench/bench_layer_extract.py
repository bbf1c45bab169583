"""Benchmark: kiln's extract_layer against `zstd -d -c blob | tar -x`.

Builds a tree of small text-ish files plus large incompressible files
(~1 GiB by default), packs it with `tar -c | zstd -3`, then times both
extractors in interleaved runs (alternating who goes first); before each run,
outside the timing, dirty data is synced and the blob is read into the page
cache.

Each run extracts into a new directory and all of them are removed at the end:
on ext4, removing 20,000 files right before a run makes the next run's inode
allocation scan past the "recently deleted" inodes (ialloc's recently_deleted()),
which cost whichever extractor ran next 2-4x and drowned the comparison.
``--remove-between`` removes each run's directory before the next run instead.

    python tests/bench/bench_layer_extract.py              # ~1 GiB, 20,000 small files
    python tests/bench/bench_layer_extract.py --size-mib 64 # quick smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from store.layer_extract import extract_layer  # noqa: E402

MiB = 1 << 20
_WORDS = (
    "layer image build cache digest manifest config index blob store runtime overlay "
    "mount namespace seccomp cgroup registry token push pull tag lower upper work diff "
    "the of and to in is for on with as by at from def return import class self None"
).split()


def make_tree(root: str, size_mib: int, seed: int = 1) -> tuple[int, int]:
    """Small files take ~1/8 of the bytes (20,000 of them at 1 GiB); the rest is large."""
    rng = random.Random(seed)
    total = size_mib * MiB
    n_small = max(100, 20_000 * size_mib // 1024)
    small_budget = total // 8
    avg = max(64, small_budget // n_small)
    written = 0
    files = 0
    for i in range(n_small):
        d = os.path.join(root, "src", f"pkg{i // 400:03d}", f"mod{(i // 40) % 10}")
        if i % 40 == 0:
            os.makedirs(d, exist_ok=True)
        n = rng.randint(avg // 4, avg * 7 // 4)
        words = []
        size = 0
        while size < n:
            w = rng.choice(_WORDS)
            words.append(w)
            size += len(w) + 1
        text = (" ".join(words) + "\n").encode()[:n]
        with open(os.path.join(d, f"file{i:05d}.py"), "wb") as f:
            f.write(text)
        written += len(text)
        files += 1
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    left = total - written
    i = 0
    while left > 0:
        n = min(left, rng.choice((8, 16, 32, 64, 128)) * MiB)
        with open(os.path.join(root, "data", f"blob{i:03d}.bin"), "wb") as f:
            for off in range(0, n, 4 * MiB):
                f.write(rng.randbytes(min(4 * MiB, n - off)))
        written += n
        left -= n
        files += 1
        i += 1
    return files, written


def settle(path: str | None, blob: str) -> None:
    """Untimed, before each run: remove a finished run's directory if asked, write back
    dirty pages, and read the blob so both extractors start with it in the page cache
    (this VM's proactive reclaim drops clean cache between runs)."""
    if path:
        shutil.rmtree(path, ignore_errors=True)
    os.sync()
    with open(blob, "rb") as f:
        while f.read(16 * MiB):
            pass


def time_reference(blob: str, dest: str) -> float:
    os.mkdir(dest)
    t = time.perf_counter()
    subprocess.run(f"zstd -q -d -c '{blob}' | tar -x -C '{dest}'", shell=True, check=True)
    return time.perf_counter() - t


def time_kiln(blob: str, dest: str, diff_id: str) -> float:
    t = time.perf_counter()
    with open(blob, "rb") as f:
        extract_layer(f, "application/vnd.oci.image.layer.v1.tar+zstd", dest,
                      expected_diff_id=diff_id)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="tree size (default 1024)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp", help="a new directory is made under it")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--remove-between", action="store_true",
                    help="remove each run's directory before the next run (see above)")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="kiln-bench-", dir=args.workdir)
    try:
        tree = os.path.join(work, "tree")
        os.mkdir(tree)
        t = time.perf_counter()
        files, size = make_tree(tree, args.size_mib)
        print(f"tree: {files} files, {size / MiB:.0f} MiB ({time.perf_counter() - t:.1f}s)")
        tar = os.path.join(work, "layer.tar")
        blob = tar + ".zst"
        subprocess.run(["tar", "-C", tree, "-cf", tar, "."], check=True)
        h = hashlib.sha256()
        with open(tar, "rb") as f:
            while chunk := f.read(4 * MiB):
                h.update(chunk)
        diff_id = "sha256:" + h.hexdigest()
        subprocess.run(["zstd", "-q", "-3", "-T0", "--rm", tar, "-o", blob], check=True)
        print(f"blob: {os.path.getsize(blob) / MiB:.0f} MiB zstd -3; diff_id {diff_id}")

        ref, kiln = [], []
        for run in range(args.runs):
            dir_a, dir_b = os.path.join(work, f"a{run}"), os.path.join(work, f"b{run}")
            # alternate who goes first, so neither always inherits the other's aftermath
            order = ("ref", "kiln") if run % 2 == 0 else ("kiln", "ref")
            for who in order:
                settle(None, blob)
                if who == "ref":
                    ref.append(time_reference(blob, dir_a))
                    settle(dir_a if args.remove_between else None, blob)
                else:
                    kiln.append(time_kiln(blob, dir_b, diff_id))
                    settle(dir_b if args.remove_between else None, blob)
            print(f"run {run + 1}: zstd|tar {ref[-1]:.2f}s  kiln {kiln[-1]:.2f}s  "
                  f"ratio {ref[-1] / kiln[-1]:.2f}x  ({' first, '.join(order)} second)")
        mb = size / 1e6
        best_ref, best_kiln = min(ref), min(kiln)
        print(f"zstd -d | tar -x : best {best_ref:.2f}s  {mb / best_ref:.0f} MB/s")
        print(f"kiln extract     : best {best_kiln:.2f}s  {mb / best_kiln:.0f} MB/s")
        print(f"ratio kiln/reference (speed): {best_ref / best_kiln:.2f}x "
              f"(median {sorted(ref)[len(ref) // 2] / sorted(kiln)[len(kiln) // 2]:.2f}x)")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
