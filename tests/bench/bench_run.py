"""`kiln run --rm IMG true` against `podman run --rm` (runc) and bare `runc run`.

Run: python tests/bench/bench_run.py [--runs 10]

What is timed, per case, from fork to exit status as a user's shell would see it:

- kiln:   ``<venv>/bin/kiln run --rm --network none bench true`` (as podman's), where <venv>
          is a scratch virtualenv made with ``python -m venv`` (so it has pip and
          setuptools, like a user's) into which a
          copy of this checkout is installed by ``pip install`` (a regular, non-editable
          install, byte-compiled by pip, with its dependencies): the console script pip
          writes, exactly what a user types after ``pip install kiln``.
- podman: ``podman run --rm --network none localhost/bench true`` (runc, cgroupfs, vfs) on a
          scratch podman store.
- runc:   ``runc run`` of a bundle made by ``runc spec`` (terminal off, args ``true``).

One busybox rootfs is imported into a scratch kiln store and a scratch podman store and laid
out as the runc bundle. The three are run once to warm caches, then timed alternately.
Targets (issue 3): kiln at most 0.5x podman and at most 1.5x runc. Also prints kiln's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "kiln", "store", "builder", "runtime",
           "registry_client")


def install_kiln(work: Path) -> Path:
    """A user's install of this checkout: a fresh venv and a non-editable pip install."""
    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        path = PROJECT / name
        if path.is_dir():
            shutil.copytree(path, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    # the venv's own setuptools hooks distutils; the isolated build env brings a newer one
    env["SETUPTOOLS_USE_DISTUTILS"] = "stdlib"
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(src)], env=env,
                   check=True, cwd=work)
    return venv / "bin" / "kiln"


def run_timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, int]:
    """Wall time from spawn to reaped exit, and the child's own peak RSS in KiB."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env, cwd=cwd)
    _pid, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return elapsed, usage.ru_maxrss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kb-", dir="/var/tmp"))
    try:
        rootfs = work / "rootfs"
        subprocess.run(["sh", str(PROJECT / "Containerfiles/busybox-rootfs.sh"), str(rootfs)],
                       check=True)
        kiln = [str(install_kiln(work))]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["KILN_ROOT"] = str(work / "kiln")
        subprocess.run(kiln + ["import", str(rootfs), "bench"], env=env, check=True,
                       stdout=subprocess.DEVNULL, cwd=work)
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
            "kiln": kiln + ["run", "--rm", "--network", "none", "bench", "true"],
            "podman": pod + ["run", "--rm", "--network", "none", "--pull", "never",
                             "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
                             "localhost/bench", "true"],
            "runc": ["runc", "run", "--bundle", str(bundle), "bench-runc"],
        }
        for cmd in cases.values():  # warm caches once
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env, cwd=work)
        times: dict[str, list[float]] = {k: [] for k in cases}
        kiln_rss = 0
        for _ in range(args.runs):
            for name, cmd in cases.items():
                elapsed, rss = run_timed(cmd, env, work)
                times[name].append(elapsed)
                if name == "kiln":
                    kiln_rss = max(kiln_rss, rss)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in med.items():
            print(f"{k:7s} median {v * 1000:7.1f} ms over {args.runs} runs")
        print(f"kiln/podman = {med['kiln'] / med['podman']:.2f} (target <= 0.5)")
        print(f"kiln/runc   = {med['kiln'] / med['runc']:.2f} (target <= 1.5)")
        print(f"kiln peak RSS (largest over its runs) = {kiln_rss / 1024:.1f} MiB")
    finally:
        subprocess.run(["umount", "-R", str(work)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
