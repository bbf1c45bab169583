"""Running services (issue 12): kiln against podman (runc, netavark bridge), in one run.

Run: python tests/bench/bench_services.py [--runs 10]

  S1  ``run --rm IMG true`` on the default bridge network        target kiln/podman <= 0.4
  S2  ``exec CTR true`` in a running container                   target <= 0.4
  S3  ``run -d -p PORT:80 IMG httpd`` until the first HTTP answer
      through the published port on 127.0.0.1                   target <= 0.5

kiln is a regular pip install of this checkout into a scratch venv (as bench_run.py does);
podman runs on a scratch store (vfs) with runc, cgroupfs and its default netavark bridge.
One busybox rootfs (with /www/index.html) is imported into both. Cases alternate.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT))

from tests.bench.bench_run import install_kiln  # noqa: E402  (needs PROJECT on the path)

TARGETS = {"S1": 0.4, "S2": 0.4, "S3": 0.5}
TITLES = {"S1": "run --rm true (bridge)", "S2": "exec true", "S3": "-d -p to first answer"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict) -> str:
    p = subprocess.run(cmd, capture_output=True, env=env, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def _timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    _run(cmd, env)
    return time.perf_counter() - t


def _until_answer(port: int, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                if r.read():
                    return
        except OSError:
            if time.perf_counter() > deadline:
                raise SystemExit(f"no answer on 127.0.0.1:{port}") from None
            time.sleep(0.002)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: both need it for bridge networking")
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-services-", dir="/var/tmp"))
    runroot = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["KILN_ROOT"] = str(work / "kiln")
    pod = ["podman", "--root", str(work / "p"), "--runroot", str(runroot), "--storage-driver",
           "vfs", "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend",
           "file"]
    ulimits = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
    started: list[list[str]] = []
    try:
        rootfs = work / "rootfs"
        subprocess.run(["sh", str(PROJECT / "Containerfiles/busybox-rootfs.sh"), str(rootfs)],
                       check=True)
        (rootfs / "www").mkdir()
        (rootfs / "www" / "index.html").write_text("hello\n")
        kiln = [str(install_kiln(work))]
        _run(kiln + ["import", str(rootfs), "bench"], env)
        tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True,
                             check=True).stdout
        subprocess.run(pod + ["import", "-", "bench"], input=tar, check=True,
                       stdout=subprocess.DEVNULL)
        image = {"kiln": "bench", "podman": "localhost/bench"}
        run = {"kiln": kiln + ["run"], "podman": pod + ["run", "--pull", "never", *ulimits]}
        runner = {"kiln": kiln, "podman": pod}
        # S2's long-running containers
        targets = {}
        for name in ("kiln", "podman"):
            cid = _run(run[name] + ["-d", image[name], "sleep", "100000"], env).strip()
            targets[name] = cid
            started.append(runner[name] + ["rm", "-f", cid])
        times: dict[str, dict[str, list[float]]] = {s: {"kiln": [], "podman": []}
                                                    for s in TARGETS}
        for round_ in range(args.runs + 1):  # the first round warms caches, untimed
            for name in ("kiln", "podman"):
                s1 = _timed(run[name] + ["--rm", image[name], "true"], env)
                s2 = _timed(runner[name] + ["exec", targets[name], "true"], env)
                port = _free_port()
                t = time.perf_counter()
                cid = _run(run[name] + ["-d", "-p", f"{port}:80", image[name], "httpd", "-f",
                                        "-p", "80", "-h", "/www"], env).strip()
                started.append(runner[name] + ["rm", "-f", cid])  # removed even if it fails
                try:
                    _until_answer(port, t + 30)
                except SystemExit as e:
                    logs = subprocess.run(runner[name] + ["logs", cid], capture_output=True,
                                          env=env, text=True)
                    raise SystemExit(f"{name}: {e} (logs: {logs.stdout}{logs.stderr})") from None
                s3 = time.perf_counter() - t
                _run(started.pop(), env)
                if round_:
                    for s, v in (("S1", s1), ("S2", s2), ("S3", s3)):
                        times[s][name].append(v)
        print(f"\nmedian ms over {args.runs} runs (min..max)")
        print(f"{'':30s}{'kiln':>22s}{'podman':>22s}   kiln/podman  target")
        for s, target in TARGETS.items():
            med = {n: statistics.median(v) for n, v in times[s].items()}
            cells = "".join(f"{med[n] * 1000:8.1f} ({min(v) * 1000:.0f}..{max(v) * 1000:.0f})"
                            .rjust(22) for n, v in times[s].items())
            ratio = med["kiln"] / med["podman"]
            verdict = "ok" if ratio <= target else "MISSED"
            print(f"{s} {TITLES[s]:27s}{cells}   {ratio:11.2f}  <= {target} {verdict}")
    finally:
        for cmd in started:
            subprocess.run(cmd, capture_output=True, env=env)
        subprocess.run(["umount", "-R", str(work)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(runroot, ignore_errors=True)


if __name__ == "__main__":
    main()
