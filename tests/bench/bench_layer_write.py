"""Benchmark kiln's layer writer against `tar | tee >(sha256sum) | zstd -T0 -3`.

    python tests/bench/bench_layer_write.py [--dir DIR] [--size-mib 1024] [--runs 3]

Makes a tree of ~SIZE MiB (20,000 small text-like files per GiB in nested dirs, plus
several large incompressible files), warms both writers once, then times them in
interleaved runs, each writing its output to a file next to the tree. Throughput is the
uncompressed tar size divided by wall time, for both.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from store.layer_writer import write_layer  # noqa: E402

SMALL_FILES_PER_GIB = 20_000
LARGE_FILES = 6
WORDS = (
    "the of and to in is for on that with as was by at from it an be this are or which "
    "layer image build container store digest manifest config overlay runtime registry "
    "python kiln tar zstd gzip sha256 import return class def self none true false if "
    "else while for try except raise yield lambda async await path file directory mode"
).split()


def make_tree(root: Path, size_mib: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    lines = []
    for _ in range(40_000):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))))
    text = ("\n".join(lines) + "\n").encode()
    small_count = max(200, SMALL_FILES_PER_GIB * size_mib // 1024)
    small_total = 0
    for i in range(small_count):
        directory = root / f"pkg{i % 40:02d}" / f"mod{(i // 40) % 25:02d}"
        if i < 1000:
            directory.mkdir(parents=True, exist_ok=True)
        size = rng.randint(200, 4096)
        start = rng.randrange(0, len(text) - size)
        (directory / f"file{i:05d}.txt").write_bytes(text[start : start + size])
        small_total += size
    large_total = max(0, size_mib * (1 << 20) - small_total)
    blobs = root / "blobs"
    blobs.mkdir()
    for i in range(LARGE_FILES):
        remaining = large_total // LARGE_FILES
        with open(blobs / f"data{i}.bin", "wb") as f:
            while remaining:
                piece = min(remaining, 8 << 20)
                f.write(os.urandom(piece))
                remaining -= piece


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_reference(tree: Path, out: Path, sums: Path) -> tuple[float, None]:
    script = f'tar -C "{tree}" -c . | tee >(sha256sum > "{sums}") | zstd -q -T0 -3 > "{out}"'
    start = time.perf_counter()
    subprocess.run(["bash", "-c", script], check=True)
    # bash does not wait for a process substitution inside a pipeline (and `wait $!` does
    # not reach it), so the sha256 is done only once its line is in the file.
    while True:
        text = sums.read_text() if sums.exists() else ""
        if len(text) >= 65 and text.endswith("\n"):
            break
        if time.perf_counter() - start > 600:
            raise SystemExit("reference pipeline did not produce a sha256")
        time.sleep(0.0005)
    # Its CPU time cannot be measured: sha256sum is never reaped by this process.
    return time.perf_counter() - start, None


def run_kiln(tree: Path, out: Path, compression: str) -> tuple[float, float, int, int]:
    start, cpu = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF)
    with open(out, "wb") as f:
        blob = write_layer(tree, f, compression=compression, source_date_epoch=0)
    elapsed = time.perf_counter() - start
    return elapsed, cpu_seconds(resource.RUSAGE_SELF) - cpu, blob.uncompressed_size, blob.size


def report(
    label: str, tar_size: int, runs: list[tuple[float, float | None]], out_size: int
) -> None:
    walls = ", ".join(f"{mbps(tar_size, wall):.0f}" for wall, _ in runs)
    best = min(wall for wall, _ in runs)
    cpus = [cpu for _, cpu in runs if cpu is not None]
    cpu = f"CPU {min(cpus):.2f}s; " if cpus else ""
    print(
        f"{label:<44} {walls} MB/s (best {mbps(tar_size, best):.0f}; "
        f"{cpu}output {out_size / 1e6:.1f} MB)"
    )


def mbps(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="work dir (default: a new dir under /var/tmp)")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    base = Path(args.dir) if args.dir else Path("/var/tmp")
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-layer-", dir=base))
    try:
        tree = work / "tree"
        tree.mkdir()
        t0 = time.perf_counter()
        make_tree(tree, args.size_mib)
        print(f"tree: ~{args.size_mib} MiB made in {time.perf_counter() - t0:.1f}s at {tree}")
        ref_out, ref_sums, kiln_out = work / "ref.tar.zst", work / "ref.sha256", work / "kiln.zst"

        def clean() -> None:
            for path in (ref_out, ref_sums, kiln_out):
                path.unlink(missing_ok=True)

        clean()
        run_reference(tree, ref_out, ref_sums)  # warm-up, both
        clean()
        run_kiln(tree, kiln_out, "zstd")
        ref_runs, kiln_runs = [], []
        for _ in range(args.runs):
            clean()
            ref_runs.append(run_reference(tree, ref_out, ref_sums))
            ref_size = ref_out.stat().st_size
            clean()
            wall, cpu, tar_size, kiln_size = run_kiln(tree, kiln_out, "zstd")
            kiln_runs.append((wall, cpu))
        print(f"tar stream: {tar_size / 1e6:.1f} MB; wall-clock MB/s of each run:")
        report("reference tar|tee >(sha256sum)|zstd -T0 -3:", tar_size, ref_runs, ref_size)
        report("kiln write_layer zstd -3:", tar_size, kiln_runs, kiln_size)
        ref_walls = sorted(wall for wall, _ in ref_runs)
        kiln_walls = sorted(wall for wall, _ in kiln_runs)
        best = ref_walls[0] / kiln_walls[0]
        median = ref_walls[len(ref_walls) // 2] / kiln_walls[len(kiln_walls) // 2]
        print(f"ratio kiln/reference: best {best:.2f}x, median {median:.2f}x (higher is better)")
        for compression in ("gzip", "none"):
            runs = []
            for _ in range(args.runs):
                clean()
                wall, cpu, tar_size, size = run_kiln(tree, kiln_out, compression)
                runs.append((wall, cpu))
            report(f"kiln write_layer {compression}:", tar_size, runs, size)
        clean()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
