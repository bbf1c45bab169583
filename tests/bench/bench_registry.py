"""Push and pull of a ~500 MB, 4-layer image to a local registry: kiln against skopeo (issue 5).

Run: python tests/bench/bench_registry.py [--runs 3] [--size-mb 500]

Setup, not timed: a scratch kiln store gets one image ``bench`` of 4 zstd layers adding up to
about SIZE MB uncompressed (layer 1 is a busybox rootfs from Containerfiles/busybox-rootfs.sh;
each layer has one large file of mixed random bytes and text, so zstd shrinks it a little,
plus a few hundred small text files). ``kiln save --format oci`` writes it as an OCI layout
(the same zstd blobs) for skopeo to push. Every run starts a fresh CNCF distribution
(/usr/bin/docker-registry, plain http on 127.0.0.1) with empty storage, so no push finds a
blob already there or mountable; kiln's blob-location cache is emptied between runs too.

What is timed: wall time from spawn to reaped exit of one CLI process, as a user's shell sees
it, after a ``sync`` so no command pays for the previous one's writeback; kiln is the console
script next to sys.executable (PYTHONDONTWRITEBYTECODE dropped), progress off for both (-q):

- push:              ``kiln push bench HOST/kiln-N:bench`` (from the store)
                     vs ``skopeo copy oci:DIR docker://HOST/skopeo-N:bench``
- ready-to-run pull: ``kiln pull HOST/skopeo-N:bench`` into an empty store (layers unpacked)
                     vs ``skopeo copy docker://... containers-storage:[overlay@G+R]...`` into an
                     empty scratch containers-storage (the host's storage is not touched)
- raw pull:          ``kiln copy docker://HOST/skopeo-N:bench oci:DIR:bench`` (empty --root)
                     vs ``skopeo copy docker://HOST/skopeo-N:bench oci:DIR:bench``

Both pulls read the repository skopeo pushed (the same manifest as kiln's, checked). Within a
run the two tools alternate, and which goes first flips from run to run. One untimed round
first warms the page cache, byte-compiles kiln and checks that each tool did the whole job.
Prints medians, kiln/skopeo ratios against the targets (push <= 0.8, ready-to-run pull <= 0.5,
raw pull <= 0.8), and per tool and case: CPU seconds (from /usr/bin/time), the registry's CPU
seconds over the same command (the registry shares the 2 cores), and peak RSS (target for
kiln: under 150 MB, flat in the image's size). Scratch goes under /var/tmp and is removed;
only skopeo's own blob-info cache (/var/lib/containers/cache) learns of the loopback registries.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT))

from store.documents import OCI_CONFIG, OCI_MANIFEST, canonical_json  # noqa: E402
from store.store import Store, host_platform  # noqa: E402
from tests.bench.bench_layer_write import WORDS  # noqa: E402
from tests.registry.servers import clean_env, start_registry  # noqa: E402

LAYERS = 4
TAG = "bench"
SMALL_FILES_PER_LAYER = 300
TARGETS = {"push": 0.8, "ready-to-run pull": 0.5, "raw pull": 0.8}
RSS_TARGET_MB = 150


# --------------------------------------------------------------------------- the image


def text_corpus(rng: random.Random, size: int) -> bytes:
    out, total = [], 0
    while total < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "\n"
        out.append(line)
        total += len(line)
    return "".join(out).encode()[:size]


def fill_layer_dir(root: Path, index: int, size: int, text: bytes, rng: random.Random) -> None:
    """~size bytes: small text files in nested dirs and one large file, 3/4 random bytes and
    1/4 text per MiB (zstd -3 keeps ~80% of it)."""
    small_total = 0
    for i in range(SMALL_FILES_PER_LAYER):
        directory = root / f"opt/app{index}/pkg{i % 10:02d}"
        directory.mkdir(parents=True, exist_ok=True)
        n = rng.randint(500, 8000)
        start = rng.randrange(0, len(text) - n)
        (directory / f"mod{i:04d}.py").write_bytes(text[start:start + n])
        small_total += n
    remaining = max(0, size - small_total)
    chunk = 1 << 20
    with open(root / f"opt/app{index}/data.bin", "wb") as f:
        while remaining:
            n = min(chunk, remaining)
            rand = n * 3 // 4
            start = rng.randrange(0, len(text) - (n - rand))
            f.write(os.urandom(rand) + text[start:start + n - rand])
            remaining -= n


def make_image(store_root: Path, work: Path, size_mb: int) -> dict:
    """The bench image in a scratch store; returns facts about it for the report."""
    store = Store(store_root)
    rng = random.Random(5)
    text = text_corpus(rng, 4 << 20)
    per_layer = size_mb * 1_000_000 // LAYERS
    layers, diff_ids, history = [], [], []
    epoch = 1_700_000_000
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    for index in range(LAYERS):
        tree = work / f"layer{index}"
        if index == 0:
            subprocess.run(["sh", str(PROJECT / "Containerfiles/busybox-rootfs.sh"), str(tree)],
                           check=True)
        else:
            tree.mkdir()
        fill_layer_dir(tree, index, per_layer, text, rng)
        desc, diff_id = store.commit_layer(tree, compression="zstd", epoch=epoch)
        layers.append(desc)
        diff_ids.append(diff_id)
        history.append({"created": created, "created_by": f"bench layer {index}"})
    config = {
        **host_platform(),
        "created": created,
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    config_desc = store.put_bytes(canonical_json(config), OCI_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc.to_json(),
                "layers": [d.to_json() for d in layers]}
    manifest_desc = store.put_bytes(canonical_json(manifest), OCI_MANIFEST)
    store.tag(TAG, manifest_desc)
    return {"digest": manifest_desc.digest, "compressed": sum(d.size for d in layers),
            "layer_sizes": [d.size for d in layers]}


# --------------------------------------------------------------------------- running


@dataclass
class Result:
    times: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)       # the tool's user+sys
    registry_cpu: dict[str, list[float]] = field(default_factory=dict)
    rss: dict[str, int] = field(default_factory=dict)  # KiB, largest seen

    def add(self, key: str, run: Timed, registry_cpu: float) -> None:
        self.times.setdefault(key, []).append(run.wall)
        self.cpu.setdefault(key, []).append(run.cpu)
        self.registry_cpu.setdefault(key, []).append(registry_cpu)
        self.rss[key] = max(self.rss.get(key, 0), run.rss_kib)

    def median(self, kind: str, key: str) -> float:
        return statistics.median(getattr(self, kind)[key])


@dataclass
class Timed:
    wall: float
    cpu: float
    rss_kib: int


def run_timed(cmd: list[str], env: dict, stats_file: Path) -> Timed:
    """Wall time from spawn to reaped exit, the command's CPU seconds and peak RSS.

    CPU and RSS come from /usr/bin/time: Linux carries a forked child's pre-exec high-water
    mark across exec, so wait4() on a child of this (large) process would report this one's.
    """
    subprocess.run(["sync"], check=True)  # nobody pays for the previous command's writeback
    with tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", "-o", str(stats_file), *cmd],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                              env=env)
        elapsed = time.perf_counter() - t
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-4000:]}")
    user, system, rss = stats_file.read_text().split()[-3:]
    return Timed(elapsed, float(user) + float(system), int(rss))


def process_cpu(pid: int) -> float:
    """User+system CPU seconds a running process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def unmount_under(path: Path) -> None:
    """containers-storage's overlay driver bind-mounts its home; undo anything left under path."""
    prefix = str(path) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def remove(path: Path) -> None:
    unmount_under(path)
    shutil.rmtree(path, ignore_errors=True)


def manifest_digest(host: str, repo: str) -> str:
    out = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{host}/{repo}:{TAG}"], capture_output=True, check=True,
                         env=clean_env()).stdout
    return "sha256:" + hashlib.sha256(out).hexdigest()


def check_result(case: str, tool: str, host: str, round_dir: Path, cs: Path) -> None:
    """In the warm-up round: each tool really did the whole job."""
    problem = None
    if case == "push":
        if manifest_digest(host, "skopeo-0") != manifest_digest(host, "kiln-0"):
            problem = "kiln and skopeo pushed different manifests"
    elif case == "ready-to-run pull" and tool == "kiln":
        layers = round_dir / "kiln-pull" / "layers"
        found = sorted(layers.glob("*/diff/opt/app*/data.bin")) if layers.is_dir() else []
        if len(found) != LAYERS:
            problem = f"kiln pull left {len(found)} unpacked layers, not {LAYERS}"
    elif case == "ready-to-run pull":
        found = list((cs / "graph" / "overlay").glob("*/diff/opt/app*/data.bin"))
        if len(found) != LAYERS:
            problem = f"skopeo left {len(found)} unpacked layers, not {LAYERS}"
    elif case == "raw pull":
        oci = round_dir / f"{tool}-oci"
        blobs = [p for p in (oci / "blobs" / "sha256").iterdir() if p.stat().st_size > 1 << 20]
        if len(blobs) != LAYERS:
            problem = f"{tool} copy wrote {len(blobs)} layer blobs, not {LAYERS}"
    if problem:
        raise SystemExit(f"{case}: {problem}")


def one_round(n: int, kiln: list[str], skopeo: list[str], env: dict, store_root: Path,
              oci_src: Path, work: Path, result: Result | None, kiln_first: bool) -> None:
    """Start a fresh registry, then push, ready-to-run pull and raw pull with both tools."""
    round_dir = work / f"round{n}"
    round_dir.mkdir()
    registry = start_registry(round_dir / "registry")
    try:
        host = registry.host
        registry_pid = registry._proc.pid
        shutil.rmtree(store_root / "cache" / "blobinfo", ignore_errors=True)
        cs = round_dir / "cs"
        cases = {
            "push": {
                "kiln": (kiln + ["--root", str(store_root), "push", "-q", TAG,
                                 f"{host}/kiln-{n}:{TAG}"], []),
                "skopeo": (skopeo + ["--dest-tls-verify=false", f"oci:{oci_src}",
                                     f"docker://{host}/skopeo-{n}:{TAG}"], []),
            },
            "ready-to-run pull": {
                "kiln": (kiln + ["--root", str(round_dir / "kiln-pull"), "pull", "-q",
                                 f"{host}/skopeo-{n}:{TAG}"], [round_dir / "kiln-pull"]),
                "skopeo": (skopeo + ["--src-tls-verify=false", f"docker://{host}/skopeo-{n}:{TAG}",
                                     f"containers-storage:[overlay@{cs}/graph+{cs}/run]"
                                     f"localhost/bench:{n}"], [cs]),
            },
            "raw pull": {
                "kiln": (kiln + ["--root", str(round_dir / "kiln-copy-store"), "copy", "-q",
                                 f"docker://{host}/skopeo-{n}:{TAG}",
                                 f"oci:{round_dir / 'kiln-oci'}:{TAG}"],
                         [round_dir / "kiln-oci", round_dir / "kiln-copy-store"]),
                "skopeo": (skopeo + ["--src-tls-verify=false", f"docker://{host}/skopeo-{n}:{TAG}",
                                     f"oci:{round_dir / 'skopeo-oci'}:{TAG}"],
                           [round_dir / "skopeo-oci"]),
            },
        }
        # issue 6: the same pull with and without --verify-key ("skopeo" is the plain
        # kiln pull here); the image is signed, untimed, once the push case has run
        verify_key = work / "bench-key"
        cases["verify-on-pull"] = {
            "kiln": (kiln + ["--root", str(round_dir / "kiln-verified"), "pull", "-q",
                             "--verify-key", f"{verify_key}.pub", f"{host}/kiln-{n}:{TAG}"],
                     [round_dir / "kiln-verified"]),
            "skopeo": (kiln + ["--root", str(round_dir / "kiln-plain"), "pull", "-q",
                               f"{host}/kiln-{n}:{TAG}"], [round_dir / "kiln-plain"]),
        }
        for case, tools in cases.items():
            if case == "verify-on-pull":
                subprocess.run(kiln + ["--root", str(store_root), "sign", "--key",
                                       f"{verify_key}.key", f"docker://{host}/kiln-{n}:{TAG}"],
                               env={**env, "KILN_PASSWORD": "bench"}, check=True,
                               stdout=subprocess.DEVNULL)
            order = ["kiln", "skopeo"] if kiln_first else ["skopeo", "kiln"]
            if case == "verify-on-pull":  # a small difference: more samples, both orders
                order = order + order[::-1] + order
            for tool in order:
                cmd, leftovers = tools[tool]
                before = process_cpu(registry_pid)
                run = run_timed(cmd, env if tool == "kiln" or case == "verify-on-pull"
                                else clean_env(), work / "stats")
                if result is not None:
                    result.add(f"{case}/{tool}", run, process_cpu(registry_pid) - before)
                if n == 0 and case in TARGETS and (case != "push" or tool == order[-1]):
                    check_result(case, tool, host, round_dir, cs)
                for path in leftovers:
                    remove(path)
    finally:
        registry.stop()
        remove(round_dir)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-mb", type=int, default=500)
    args = ap.parse_args()
    kiln = [str(Path(sys.executable).parent / "kiln")]
    if not os.access(kiln[0], os.X_OK):
        raise SystemExit(f"{kiln[0]} is missing: run with the python of a venv kiln is "
                         "installed in")
    skopeo = ["skopeo", "copy", "-q"]
    env = {k: v for k, v in clean_env().items() if k != "PYTHONDONTWRITEBYTECODE"}
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-registry-", dir="/var/tmp"))
    started = time.perf_counter()
    try:
        store_root = work / "store"
        t = time.perf_counter()
        facts = make_image(store_root, work, args.size_mb)
        oci_src = work / "oci-src"
        subprocess.run(kiln + ["--root", str(store_root), "save", "-q", "--format", "oci",
                               "-o", str(oci_src), TAG], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        sizes = ", ".join(f"{s / 1e6:.0f}" for s in facts["layer_sizes"])
        print(f"image: {LAYERS} zstd layers, {facts['compressed'] / 1e6:.0f} MB compressed "
              f"({sizes} MB), ~{args.size_mb} MB uncompressed; made in "
              f"{time.perf_counter() - t:.1f}s")
        subprocess.run(kiln + ["key", "generate", "-o", str(work / "bench-key")],
                       env={**env, "KILN_PASSWORD": "bench"}, check=True,
                       stdout=subprocess.DEVNULL)
        print("warm-up round (untimed) ...", flush=True)
        one_round(0, kiln, skopeo, env, store_root, oci_src, work, None, True)
        result = Result()
        for n in range(1, args.runs + 1):
            one_round(n, kiln, skopeo, env, store_root, oci_src, work, result, n % 2 == 1)
        print(f"\nmedians over {args.runs} runs: wall seconds, kiln/skopeo against the target")
        for case, target in TARGETS.items():
            k = result.median("times", f"{case}/kiln")
            s = result.median("times", f"{case}/skopeo")
            verdict = "ok" if k / s <= target else "MISSED"
            print(f"  {case:18s} kiln {k:6.2f}s  skopeo {s:6.2f}s  ratio {k / s:5.3f} "
                  f"(target <= {target}: {verdict})")
        v = result.median("times", "verify-on-pull/kiln")
        plain = result.median("times", "verify-on-pull/skopeo")
        print(f"  verify-on-pull     kiln pull --verify-key {v:6.2f}s  kiln pull {plain:6.2f}s  "
              f"overhead {100 * (v / plain - 1):+5.1f}% (target < 5%: "
              f"{'ok' if v / plain < 1.05 else 'MISSED'})")
        print("each run's wall seconds; median CPU seconds (user+sys) of the tool and of the "
              "registry; peak RSS MiB (largest over runs):")
        for case in TARGETS:
            for tool in ("kiln", "skopeo"):
                key = f"{case}/{tool}"
                runs = ", ".join(f"{x:.2f}" for x in result.times[key])
                print(f"  {case:18s} {tool:6s} [{runs}]  CPU {result.median('cpu', key):5.2f} "
                      f"registry CPU {result.median('registry_cpu', key):5.2f}  "
                      f"RSS {result.rss[key] / 1024:4.0f}")
        peak = max(result.rss[f"{case}/kiln"] for case in TARGETS) / 1024
        print(f"kiln peak RSS over all operations: {peak:.0f} MiB (target < {RSS_TARGET_MB})")
        print(f"total bench time {time.perf_counter() - started:.0f}s")
    finally:
        remove(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
