"""`kiln run --rm IMG true` against `podman run --rm` (runc) and bare `runc run`.

Run: python tests/bench/bench_run.py [--runs 10]
One busybox rootfs: imported into a scratch kiln store, imported into a scratch podman
store, and laid out as a runc bundle. The three are timed alternately in one run.
Targets (issue 3): kiln at most 0.5x podman and at most 1.5x runc. Also prints kiln's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kb-", dir="/var/tmp"))
    try:
        rootfs = work / "rootfs"
        subprocess.run(["sh", str(PROJECT / "Containerfiles/busybox-rootfs.sh"), str(rootfs)],
                       check=True)
        # as installed by pip: byte-compiled modules are used, not recompiled on every run
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["KILN_ROOT"] = str(work / "kiln")
        kiln = [sys.executable, "-m", "kiln"]
        subprocess.run(kiln + ["import", str(rootfs), "bench"], env=env, check=True,
                       stdout=subprocess.DEVNULL, cwd=PROJECT)
        pod = ["podman", "--root", str(work / "p"), "--runroot",
               tempfile.mkdtemp(prefix="r", dir="/tmp"), "--storage-driver", "vfs",
               "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]
        tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True,
                             check=True).stdout
        subprocess.run(pod + ["import", "-", "bench"], input=tar, check=True,
                       stdout=subprocess.DEVNULL)
        bundle = work / "bundle"
        bundle.mkdir()
        shutil.copytree(rootfs, bundle / "rootfs", symlinks=True)
        subprocess.run(["runc", "spec"], cwd=bundle, check=True)
        spec = json.loads((bundle / "config.json").read_text())
        spec["process"]["terminal"] = False
        spec["process"]["args"] = ["true"]
        (bundle / "config.json").write_text(json.dumps(spec))
        cases = {
            "kiln": kiln + ["run", "--rm", "bench", "true"],
            "podman": pod + ["run", "--rm", "--network", "none", "--pull", "never",
                             "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
                             "localhost/bench", "true"],
            "runc": ["runc", "run", "--bundle", str(bundle), "bench-runc"],
        }
        for cmd in cases.values():  # warm caches once
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env, cwd=PROJECT)
        times: dict[str, list[float]] = {k: [] for k in cases}
        kiln_rss = 0
        for _ in range(args.runs):
            for name, cmd in cases.items():
                before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
                t = time.perf_counter()
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env,
                               cwd=PROJECT)
                times[name].append(time.perf_counter() - t)
                if name == "kiln":
                    kiln_rss = max(kiln_rss, resource.getrusage(
                        resource.RUSAGE_CHILDREN).ru_maxrss, before)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in med.items():
            print(f"{k:7s} median {v * 1000:7.1f} ms over {args.runs} runs")
        print(f"kiln/podman = {med['kiln'] / med['podman']:.2f} (target <= 0.5)")
        print(f"kiln/runc   = {med['kiln'] / med['runc']:.2f} (target <= 1.5)")
        print(f"kiln peak RSS (max over children so far) = {kiln_rss / 1024:.1f} MiB")
    finally:
        subprocess.run(["umount", "-R", str(work)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
