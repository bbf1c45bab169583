"""`kiln build` of Containerfiles with many metadata instructions (issue 10, point 5).

Run: python tests/bench/bench_many_steps.py [--counts 5000,10000,100000] [--kinds ENV,LABEL,ARG]
                                            [--timeout 300] [--buildah [--buildah-count N]]

Each case is FROM busybox and COUNT lines of one kind (ENV Vn=value-n, LABEL, ARG), built
into a fresh store holding only the base. Printed per case: the cold build's time, the
no-op rebuild's time (nothing changed), and the cache/ directory after the rebuild (files,
bytes of content, disk usage). A build that takes longer than --timeout is stopped and
reported as such. --buildah also builds ENV lines (the first count, or --buildah-count) with
`buildah bud --layers` (cold and no-op) and prints kiln's time over buildah's (buildah
1.28 here did not finish 5,000 ENV lines in 15 minutes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT))

LINES = {
    "ENV": "ENV V{i}=value-{i}\n",
    "LABEL": "LABEL org.example.l{i}=value-{i}\n",
    "ARG": "ARG A{i}=value-{i}\n",
}


def containerfile(kind: str, count: int) -> str:
    line = LINES[kind]
    return "FROM busybox\n" + "".join(line.format(i=i) for i in range(count))


def tree_size(path: Path) -> tuple[int, int, int]:
    """(files, bytes of content, bytes on disk)."""
    files = content = disk = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            files += 1
            content += st.st_size
            disk += st.st_blocks * 512
    return files, content, disk


class Kiln:
    def __init__(self, work: Path, rootfs: Path):
        self.work = work
        self.rootfs = rootfs
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        self.generation = 0

    def fresh(self) -> Path:
        self.generation += 1
        root = self.work / f"kiln-{self.generation}"
        self.env["KILN_ROOT"] = str(root)
        subprocess.run([sys.executable, "-m", "kiln", "import", str(self.rootfs), "busybox"],
                       env=self.env, cwd=PROJECT, check=True, capture_output=True)
        return root

    def build(self, ctx: Path, timeout: float) -> float | None:
        t = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, "-m", "kiln", "build", "-q", "-t", "many:1",
                                str(ctx)], env=self.env, cwd=PROJECT, capture_output=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if p.returncode != 0:
            sys.exit(f"kiln build failed ({p.returncode}):\n{p.stderr.decode()[-3000:]}")
        return time.perf_counter() - t


def buildah_times(work: Path, rootfs: Path, ctx: Path, timeout: float) -> tuple:
    """(cold, no-op) seconds of buildah bud --layers on ``ctx``; None for one that timed out."""
    from tests.interop.conftest import private_container_tools

    tools = private_container_tools(work / "buildah")
    env = tools.env
    tar = work / "busybox.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
    tools.buildah("from", "--name", "imp", "scratch")
    tools.buildah("add", "imp", str(tar), "/")
    tools.buildah("commit", "-q", "imp", "localhost/busybox:latest")
    tools.buildah("rm", "imp")
    (ctx / "Containerfile.buildah").write_text(
        (ctx / "Containerfile").read_text().replace("FROM busybox", "FROM localhost/busybox", 1))
    full_env = {**os.environ, **env}
    times = []
    for _ in range(2):
        t = time.perf_counter()
        try:
            subprocess.run(["buildah", *tools._storage_flags(), "bud", "--runtime",
                            "/usr/sbin/runc", "--layers", "--pull=never", "-q",
                            "-f", str(ctx / "Containerfile.buildah"), "-t", "many:1",
                            str(ctx)], env=full_env, check=True, capture_output=True,
                           timeout=timeout)
            times.append(time.perf_counter() - t)
        except subprocess.TimeoutExpired:
            times.append(None)
            break
    tools.buildah("rm", "--all", check=False)
    subprocess.run(["umount", "-R", str(tools.root)], capture_output=True)
    shutil.rmtree(tools.runroot, ignore_errors=True)
    return tuple(times + [None] * (2 - len(times)))


def _fmt(t: float | None, timeout: float) -> str:
    return f">{timeout:.0f} (stopped)" if t is None else f"{t:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="5000,10000,100000")
    ap.add_argument("--kinds", default="ENV,LABEL,ARG")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per build")
    ap.add_argument("--buildah", action="store_true", help="also time buildah on ENV")
    ap.add_argument("--buildah-count", type=int, default=None,
                    help="ENV lines for buildah (default: the first count)")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    kinds = args.kinds.split(",")
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-many-", dir="/var/tmp"))
    try:
        rootfs = work / "busybox-rootfs"
        subprocess.run(["sh", str(PROJECT / "Containerfiles/busybox-rootfs.sh"), str(rootfs)],
                       check=True)
        kiln = Kiln(work, rootfs)
        print(f"{'case':>14s} {'cold s':>16s} {'no-op s':>16s} {'cache files':>12s} "
              f"{'cache bytes':>12s} {'cache on disk':>14s} {'bytes/step':>10s}")
        first_env = None
        if args.buildah_count is not None:
            counts_for = {"ENV": [args.buildah_count] + counts}
        else:
            counts_for = {}
        for kind in kinds:
            for count in counts_for.get(kind, counts):
                ctx = work / f"ctx-{kind}-{count}"
                ctx.mkdir()
                (ctx / "Containerfile").write_text(containerfile(kind, count))
                root = kiln.fresh()
                cold = kiln.build(ctx, args.timeout)
                noop = kiln.build(ctx, args.timeout) if cold is not None else None
                files, content, disk = tree_size(root / "cache")
                print(f"{kind + ' ' + str(count):>14s} {_fmt(cold, args.timeout):>16s} "
                      f"{_fmt(noop, args.timeout):>16s} {files:12d} {content:12d} {disk:14d} "
                      f"{content / count:10.1f}", flush=True)
                shutil.rmtree(root, ignore_errors=True)
                if kind == "ENV" and first_env is None:
                    first_env = (ctx, cold, noop)
        if args.buildah and first_env is not None:
            if not shutil.which("buildah"):
                print("buildah: not installed, left out")
                return
            ctx, cold, noop = first_env
            b_cold, b_noop = buildah_times(work, rootfs, ctx, args.timeout)
            n = args.buildah_count or counts[0]
            print(f"buildah bud --layers, ENV {n}: cold {_fmt(b_cold, args.timeout)} s, "
                  f"no-op {_fmt(b_noop, args.timeout)} s")
            for what, mine, theirs in (("cold", cold, b_cold), ("no-op", noop, b_noop)):
                if mine is None:
                    continue
                if theirs is None:  # buildah was stopped: kiln's share is at most this
                    print(f"kiln/buildah {what}: < {mine / args.timeout:.4f}")
                else:
                    print(f"kiln/buildah {what}: {mine / theirs:.4f}")
    finally:
        subprocess.run(["umount", "-R", str(work / "buildah" / "storage")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
