"""`kiln images` with 1,000 tags: the issue's target is under 0.3 s, against `podman images`.

Run: python tests/bench/bench_images.py [--tags 1000]
Makes a scratch kiln store (one busybox image plus N-1 more tags of 10 distinct images) and a
scratch podman store with the same number of tags, then times each listing 5 times.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT))


def timed(cmd, env=None, runs=5):
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tags", type=int, default=1000)
    args = ap.parse_args()
    from store.documents import Descriptor
    from store.importer import import_rootfs
    from store.store import Store

    work = Path(tempfile.mkdtemp(prefix="kiln-bench-images-", dir="/var/tmp"))
    try:
        rootfs = work / "rootfs"
        subprocess.run(["sh", str(PROJECT / "Containerfiles/busybox-rootfs.sh"), str(rootfs)],
                       check=True)
        store = Store(work / "kiln")
        descs = []
        for i in range(10):
            (rootfs / "variant").write_text(str(i))
            descs.append(import_rootfs(store, rootfs, f"base{i}:latest", epoch=0))
        # 1,000 index.json entries in one write, as 1,000 `kiln tag` calls would leave them
        with store.layout.editing_index() as manifests:
            for i in range(args.tags - 10):
                d = descs[i % 10]
                manifests.append(Descriptor(d.media_type, d.digest, d.size, annotations={
                    "org.opencontainers.image.ref.name": f"docker.io/team/app{i}:v{i}"}))
        env = {**os.environ, "KILN_ROOT": str(store.root)}
        n = len(store.tags())
        kiln_s = timed([sys.executable, "-m", "kiln", "images"], env)
        kiln_json = timed([sys.executable, "-m", "kiln", "images", "--format", "json"], env)
        print(f"kiln images, {n} tags:           {kiln_s * 1000:7.1f} ms (target < 300 ms)")
        print(f"kiln images --format json:       {kiln_json * 1000:7.1f} ms")
        if shutil.which("podman"):
            proot = work / "podman"
            pflags = ["podman", "--root", str(proot / "root"), "--runroot", str(proot / "run"),
                      "--storage-driver", "vfs"]
            rootfs_tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."],
                                        capture_output=True, check=True).stdout
            subprocess.run(pflags + ["import", "-", "base:latest"], input=rootfs_tar,
                           check=True, stdout=subprocess.DEVNULL)
            names = [f"docker.io/team/app{i}:v{i}" for i in range(args.tags - 1)]
            for chunk in range(0, len(names), 200):
                subprocess.run(pflags + ["tag", "base:latest", *names[chunk:chunk + 200]],
                               check=True)
            pod_s = timed(pflags + ["images"])
            print(f"podman images, {args.tags} tags:        {pod_s * 1000:7.1f} ms")
            print(f"ratio kiln/podman (lower is better): {kiln_s / pod_s:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
