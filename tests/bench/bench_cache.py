"""A fresh CI runner's rebuild from a registry build cache: kiln --cache-from against
buildah bud --layers --cache-from, on one local registry (issue 13).

Run: python tests/bench/bench_cache.py [--quick] [--runs 3]

The benchmark image (Containerfiles/bench, as B1 of bench_build.py) is built once per tool
from the base image on the registry, writing its cache there (kiln --cache-to
type=registry,...,mode=max; buildah --cache-to REPO). Then, in turns, each tool starts
from an empty store and rebuilds the unchanged Containerfile with --cache-from: that is
what is timed (pulling the base image included; every step must come from the cache).
Target (issue 13): kiln time / buildah time <= 0.3.
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

from tests.bench.bench_build import CONTAINERFILE, Inputs, _unmount_below  # noqa: E402
from tests.interop.conftest import ContainerTools, private_container_tools  # noqa: E402
from tests.registry.servers import start_registry  # noqa: E402

TARGET = 0.3


def kiln_cmd(root: Path, *args: str) -> list[str]:
    script = Path(sys.executable).parent / "kiln"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "kiln"]
    return [*cmd, "--root", str(root), *args]


def run(cmd: list[str], env: dict | None = None) -> str:
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                       cwd=PROJECT)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {p.returncode}:\n"
                 f"{p.stdout.decode(errors='replace')[-4000:]}")
    return p.stdout.decode(errors="replace")


def buildah_tools(base: Path) -> ContainerTools:
    return private_container_tools(base, "kc-")


def main() -> None:
    ap = argparse.ArgumentParser(description="fresh-runner rebuild from a registry cache")
    ap.add_argument("--quick", action="store_true", help="small context, one round")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    files, mb, runs = (300, 20, 1) if args.quick else (3000, 200, args.runs)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-cache-", dir="/var/tmp"))
    registry = start_registry(work / "registry")
    all_tools: list[ContainerTools] = []
    try:
        inputs = Inputs(work, files, mb)
        base = f"{registry.host}/bench/busybox:1"
        seed = work / "seed"
        run(kiln_cmd(seed, "import", str(inputs.rootfs), base), env)
        run(kiln_cmd(seed, "push", "-q", base), env)
        containerfile = work / "Containerfile"
        # ENV, not ARG: buildah 1.28 takes nothing from its remote cache after an ARG step
        # (it pushes the ARG step's cache image but never looks it up), so both tools get
        # the benchmark with MB fixed by ENV
        text = CONTAINERFILE.read_text().replace("FROM busybox", f"FROM {base}", 1)
        containerfile.write_text(text.replace("ARG MB=200", f"ENV MB={mb}", 1))
        kiln_cache = f"{registry.host}/bench/kiln-cache:1"
        buildah_cache = f"{registry.host}/bench/buildah-cache"
        build_args = ["-f", str(containerfile)]
        print(f"context: {files} files, RUN steps write ~{mb} MB; {runs} round(s); "
              f"registry {registry.host}; work dir {work}", flush=True)

        # the runner that wrote the cache (not timed)
        out = run(kiln_cmd(work / "kiln-warm", "build", "--network", "none", *build_args,
                           "--iidfile", str(work / "kiln-warm.iid"), "--cache-to",
                           f"type=registry,ref={kiln_cache},mode=max",
                           str(inputs.context)), env)
        print(next(line for line in out.splitlines() if line.startswith("--> cache:")))
        warm = buildah_tools(work / "buildah-warm")
        all_tools.append(warm)
        warm.buildah("bud", "--runtime", "/usr/sbin/runc", "--layers", "--tls-verify=false",
                     "--network", "none", "-q", *build_args, "--cache-to", buildah_cache,
                     "--iidfile", str(work / "buildah-warm.iid"), str(inputs.context))

        times: dict[str, list[float]] = {"kiln": [], "buildah": []}
        for n in range(runs):
            root = work / f"kiln-fresh-{n}"
            t = time.perf_counter()
            out = run(kiln_cmd(root, "build", "--network", "none", *build_args,
                               "--iidfile", str(work / "kiln.iid"), "--cache-from",
                               f"type=registry,ref={kiln_cache}", str(inputs.context)), env)
            times["kiln"].append(time.perf_counter() - t)
            if (work / "kiln.iid").read_text() != (work / "kiln-warm.iid").read_text():
                # its RUN steps write random bytes: an image ID kept means nothing ran
                sys.exit(f"kiln: the fresh runner built another image:\n{out[-3000:]}")

            tools = buildah_tools(work / f"buildah-fresh-{n}")
            all_tools.append(tools)
            t = time.perf_counter()
            built = tools.buildah("bud", "--runtime", "/usr/sbin/runc", "--layers",
                          "--tls-verify=false", "--network", "none", *build_args,
                          "--cache-from", buildah_cache, "--iidfile", str(work / "buildah.iid"),
                          str(inputs.context))
            times["buildah"].append(time.perf_counter() - t)
            if (work / "buildah.iid").read_text() != (work / "buildah-warm.iid").read_text():
                ran = (built.stdout + built.stderr).count("Using cache")
                print(f"buildah: the fresh runner's image ID differs from the warm one's; "
                      f"{ran} steps said 'Using cache'")
                if not ran:
                    print(built.stdout[-2000:], built.stderr[-2000:])

        print(f"\nmedian seconds over {runs} round(s) (min..max)")
        cells = {}
        for tool, ts in times.items():
            cells[tool] = statistics.median(ts)
            print(f"  {tool:<8} {cells[tool]:7.2f} ({min(ts):.2f}..{max(ts):.2f})")
        ratio = cells["kiln"] / cells["buildah"]
        verdict = "ok" if ratio <= TARGET else "MISSED"
        print(f"C1 fresh-runner rebuild from a registry cache: kiln/buildah {ratio:.2f}  "
              f"target <= {TARGET} {verdict}")
    finally:
        registry.stop()
        for tools in all_tools:
            tools.buildah("rm", "--all", check=False)
            for path in (tools.base, tools.runroot):
                _unmount_below(path)
                shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
