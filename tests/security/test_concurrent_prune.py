"""Issue 10, point 3: `kiln prune` running while pulls and builds write to the same store.

Prune must never remove what a writer in flight has written (staged blobs, layer dirs,
the blobs of an image about to be tagged), and no writer may tag an image whose blobs
are not all in the store. Everything here is real: a docker-registry on 127.0.0.1, kiln
CLI processes started at once on one KILN_ROOT, busybox images, skopeo reading the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PROJECT, KilnCLI
from tests.interop.conftest import require_tool, run_tool
from tests.registry.servers import REGISTRY_BIN, start_registry

ROUNDS = 5
PULLED = 3     # images on the registry, pulled under a fresh tag every round
BIG_LAYER = 16 * 1000 * 1000  # incompressible bytes per big layer: a pull takes a moment


def _env(root: Path) -> dict:
    return {**os.environ, "KILN_ROOT": str(root)}


def _start(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kiln", *args], cwd=PROJECT,
                            env=_env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen, what: str, timeout: float = 120) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{err.decode()[-3000:]}"
    return out.decode()


@pytest.fixture(scope="module")
def seeded_registry(tmp_path_factory, busybox_rootfs):
    """A registry holding img0..img2 (busybox plus four big layers each) under tags
    r0..r4, pushed by kiln from a store of its own."""
    if not REGISTRY_BIN.exists():
        pytest.skip(f"{REGISTRY_BIN} is missing (apt-get install docker-registry)")
    work = tmp_path_factory.mktemp("concurrent-prune")
    server = start_registry(work / "registry")
    try:
        seed = KilnCLI(work / "seed")
        seed("import", str(busybox_rootfs), "busybox")
        for k in range(PULLED):
            ctx = work / f"seed-ctx{k}"
            ctx.mkdir()
            (ctx / "big1").write_bytes(os.urandom(BIG_LAYER))
            (ctx / "big3").write_bytes(os.urandom(BIG_LAYER))
            (ctx / "Containerfile").write_text(
                "FROM busybox\n"
                "COPY big1 /data/big1\n"
                f"RUN head -c {BIG_LAYER} /dev/urandom > /data/big2\n"
                "COPY big3 /data/big3\n"
                f"RUN head -c {BIG_LAYER} /dev/urandom > /data/big4 && echo img{k} > /id\n")
            seed("build", "-q", "-t", f"seed{k}", str(ctx))
            seed("push", "-q", f"seed{k}", f"{server.host}/concur/img{k}:r0")
        from registry_client.push import push  # the other tags: only a manifest each
        from store.store import Store

        for k in range(PULLED):
            for r in range(1, ROUNDS):
                push(Store(work / "seed"), f"seed{k}", f"{server.host}/concur/img{k}:r{r}")
        yield server
    finally:
        server.stop()


def _build_context(base: Path, lane: int, round_: int) -> Path:
    ctx = base / f"build{lane}-r{round_}"
    ctx.mkdir()
    (ctx / "payload").write_bytes(os.urandom(300_000))
    (ctx / "Containerfile").write_text(
        "FROM busybox\n"
        "COPY payload /payload\n"
        f"RUN head -c 500000 /dev/urandom > /noise && echo build{lane}-r{round_} > /id\n"
        "COPY payload /payload2\n")
    return ctx


def _round(root: Path, host: str, tmp: Path, r: int) -> list[tuple[str, str]]:
    """2 pulls, 2 builds and 2 lanes of back-to-back prunes, all at once; returns the
    (tag, content of /id) the round made."""
    pulls = [(f"{host}/concur/img{(2 * r + i) % PULLED}:r{r}", f"img{(2 * r + i) % PULLED}")
             for i in range(2)]
    builds = [(f"localhost/build{j}:r{r}", f"build{j}-r{r}") for j in range(2)]
    writers = [(_start(root, "pull", "-q", tag), f"pull {tag}") for tag, _ in pulls]
    writers += [(_start(root, "build", "-q", "--no-cache", "-t", tag,
                        str(_build_context(tmp, j, r))), f"build {tag}")
                for j, (tag, _) in enumerate(builds)]
    lanes: list[subprocess.Popen | None] = [_start(root, "prune"), _start(root, "prune")]
    deadline = time.monotonic() + 180
    # each lane runs prune again as soon as its last one ended, until every writer is done:
    # a prune is always waiting for the store while the writers work
    while time.monotonic() < deadline:
        writers_done = all(p.poll() is not None for p, _ in writers)
        for i, lane in enumerate(lanes):
            if lane is not None and lane.poll() is not None:
                _finish(lane, "prune")
                lanes[i] = None if writers_done else _start(root, "prune")
        if writers_done and lanes == [None, None]:
            break
        time.sleep(0.01)
    for proc, what in writers:
        _finish(proc, what)
    assert lanes == [None, None], "prune lanes did not finish"
    return pulls + builds


def _blobs_of(store_root: Path, digest: str) -> list[str]:
    raw = (store_root / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
    doc = json.loads(raw)
    if "manifests" in doc:
        return [d for m in doc["manifests"] for d in [m["digest"], *_blobs_of(store_root,
                                                                               m["digest"])]]
    return [doc["config"]["digest"]] + [la["digest"] for la in doc["layers"]]


def _check_tags_whole(root: Path, kiln: KilnCLI) -> None:
    """`kiln images` works and every tag's manifest, config and layers are in blobs/."""
    images = kiln("images", "--format", "json", check=False)
    assert images.returncode == 0, images.err
    blobs = root / "blobs" / "sha256"
    for entry in json.loads((root / "index.json").read_bytes())["manifests"]:
        name = entry["annotations"]["org.opencontainers.image.ref.name"]
        assert (blobs / entry["digest"].removeprefix("sha256:")).is_file(), (
            f"{name}: its manifest {entry['digest']} is gone")
        for digest in _blobs_of(root, entry["digest"]):
            assert (blobs / digest.removeprefix("sha256:")).is_file(), (
                f"{name} needs {digest}, which is gone")


def test_pulls_builds_and_prunes_at_once_leave_every_tag_whole(
        seeded_registry, busybox_rootfs, tmp_path):
    root = tmp_path / "root"
    kiln = KilnCLI(root)
    kiln("import", str(busybox_rootfs), "busybox")
    expected: dict[str, str] = {}
    for r in range(ROUNDS):
        made = _round(root, seeded_registry.host, tmp_path, r)
        _check_tags_whole(root, kiln)
        expected.update(made)
        if r < ROUNDS - 1:
            # the pulled images go again (the next round pulls them whole, not just their
            # names), and so does one build: the next prunes have real work
            for tag, _ in made[:2] + made[3:]:
                kiln("rmi", tag)
                del expected[tag]

    images = json.loads(kiln("images", "--format", "json").out)
    names = {n for row in images for n in row["Names"]}
    assert set(expected) <= names, f"missing from kiln images: {set(expected) - names}"

    for tag, content in expected.items():
        p = kiln("run", "--rm", tag, "cat", "/id", check=False)
        assert p.returncode == 0 and p.out.strip() == content, (tag, p.returncode, p.err)
    kiln("run", "--rm", "busybox", "true")

    skopeo = require_tool("skopeo")
    for tag in [*expected, "docker.io/library/busybox:latest"]:
        run_tool([skopeo, "inspect", f"oci:{root}:{tag}"])

    for path in (root / "blobs" / "sha256").iterdir():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        assert h.hexdigest() == path.name, f"blob {path.name} does not hash to its name"

    kiln("prune")
    _check_tags_whole(root, kiln)
    assert os.listdir(root / "tmp") == []


def _wait_for(predicate, what: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"{what} never happened: the process ended first "
                        f"({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} never happened within {timeout} s")
        time.sleep(0.005)


def test_save_keeps_its_tmp_work_while_other_kilns_start_and_prune(tmp_path):
    """`kiln save --compression-format` re-compresses layers in the store's tmp/: a kiln
    starting meanwhile (which cleans an idle store's tmp/) or a prune must leave it be."""
    root = tmp_path / "root"
    kiln = KilnCLI(root)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(48 * 1000 * 1000))
    kiln("import", str(tree), "big:1")
    out = tmp_path / "saved"
    save = _start(root, "save", "-q", "--format", "oci", "--compression-format", "gzip",
                  "-o", str(out), "big:1")
    _wait_for(lambda: any(n.startswith("recompress-") for n in os.listdir(root / "tmp")),
              "a re-compressed layer in tmp/", save)
    kiln("images")  # a kiln starting up, with tmp/ not empty
    prune = _start(root, "prune")
    _finish(save, "kiln save")
    _finish(prune, "kiln prune")
    run_tool([require_tool("skopeo"), "inspect", f"oci:{out}:docker.io/library/big:1"])
    assert os.listdir(root / "tmp") == []


def test_a_pull_killed_midway_leaves_nothing_a_prune_does_not_clean(seeded_registry, tmp_path):
    root = tmp_path / "root"
    kiln = KilnCLI(root)
    kiln("images")  # the store exists before the pull starts
    ref = f"{seeded_registry.host}/concur/img1:r0"
    pull = _start(root, "pull", "-q", ref)

    def staged_a_layer() -> bool:
        return any(name.startswith("blob-") or name == "layers"
                   for stage in (root / "tmp").glob("stage-*")
                   for name in os.listdir(stage))

    _wait_for(staged_a_layer, "a layer staged in tmp/", pull)
    pull.kill()
    pull.wait()
    assert kiln("images", "--format", "json").out.strip() == "[]"
    kiln("prune")
    assert os.listdir(root / "tmp") == []
    assert os.listdir(root / "blobs" / "sha256") == []
    assert os.listdir(root / "layers") == []
    kiln("pull", "-q", ref)  # and the store takes the image whole afterwards
    assert kiln("run", "--rm", ref, "cat", "/id").out.strip() == "img1"
