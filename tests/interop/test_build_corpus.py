"""The build corpus: kiln builds what Docker builds, checked against buildah case by case.

Every directory of tests/interop/build_corpus/ is one case: a Containerfile (or
Dockerfile), its context files, and optionally ``context.json`` (what git cannot keep:
symlinks, hardlinks, modes, owners, xattrs, archives; see corpus_context.py) and
``case.toml``:

    file = "sub/Build.file"        # -f, relative to the context
    target = "stage"               # --target
    build_args = { A = "1" }       # --build-arg
    error = "text"                 # Docker refuses to build this: kiln must fail with
                                   # `kiln: error: ...text...`, and so must buildah

Each case is built by kiln (``kiln build``, one store for the corpus) and by
``buildah bud --runtime /usr/sbin/runc --layers --format docker`` (one containers-storage
for the corpus) from the same busybox base, byte for byte: imported into kiln once and
handed to buildah with ``kiln save`` + ``skopeo copy``. The cases run a few at a time in
threads; each builder's image is read from its own storage (kiln's store is an OCI layout:
its blobs are what ``kiln save`` copies; buildah's image goes through ``skopeo copy`` to a
``dir:``, uncompressed) and compared:

* the runtime config: CONFIG_FIELDS, absent/null/empty being the same;
* the merged root filesystem, computed from the layer tars (layer_tree.py): names,
  types, modes with setuid/setgid/sticky, owners, sizes, content digests, symlink
  targets, hardlink groups, xattrs, devices.

What is ignored, and why:

* mtimes and the image's created/history: buildah keeps the build host's times, kiln
  clamps them (neither is something the Containerfile says);
* the ``io.buildah.version`` label buildah stamps on everything it commits;
* the mount points buildah leaves in each RUN layer (RUN_MOUNT_STUBS) when the base
  lacks them: empty placeholders for its bind mounts, not changes the Containerfile made
  (BuildKit removes its own such stubs after each RUN: executor/stubs.go);
* config fields that are no runtime settings (Hostname, Image, ArgsEscaped...).

Where buildah 1.28 and Docker (BuildKit, the Dockerfile reference) disagree, kiln follows
Docker: build_corpus/DIVERGENCES.toml says, per case, how Docker's image differs from
buildah's (or gives a Containerfile in buildah's dialect that builds Docker's image), with
the reference that decides it, and the case asserts kiln's image equals that. Cases kiln
fails today are listed in KNOWN_FAILURES (strict xfail): the list shrinks as fixes land.

Running it: the whole corpus (about 230 cases) takes 2-4 minutes on two cores; with -k or
node ids only the selected cases are built. KILN_CORPUS_REPORT=out.json writes every
built case's differences (empty when kiln matches), the work queue for fixers.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import PROJECT
from tests.interop.conftest import (
    make_container_tools,
    remove_container_tools,
    require_tool,
    run_tool,
)
from tests.interop.corpus_context import materialise
from tests.interop.layer_tree import Entry, LayerCache, merged_view

pytestmark = pytest.mark.interop

CORPUS = Path(__file__).parent / "build_corpus"
DIVERGENCES = CORPUS / "DIVERGENCES.toml"
BASE = "docker.io/library/busybox:latest"
WORKERS = 4  # cases built at once: kiln and buildah mostly wait on I/O and runc
BUILD_TIMEOUT = 300

CONFIG_FIELDS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "Labels", "ExposedPorts",
                 "Volumes", "StopSignal", "Healthcheck", "Shell", "OnBuild")
RUN_MOUNT_STUBS = ("/run", "/run/.containerenv", "/etc/hostname", "/etc/hosts",
                   "/etc/resolv.conf")

# Cases kiln gets wrong today: case -> what differs and which issue point fixes it.
# Each runs as a strict xfail, so a fix that makes one pass fails the suite until its line
# here goes.
KNOWN_FAILURES: dict[str, str] = {
    # -- found by the corpus ------------------------------------------------------------
}


# ------------------------------------------------------------------ the cases


@dataclass
class Case:
    name: str
    dir: Path
    file: str = ""
    target: str | None = None
    build_args: dict[str, str] = field(default_factory=dict)
    error: str | None = None


def _load_case(d: Path) -> Case:
    opts = tomllib.loads((d / "case.toml").read_text()) if (d / "case.toml").is_file() else {}
    unknown = set(opts) - {"file", "target", "build_args", "error"}
    assert not unknown, f"{d.name}/case.toml: unknown keys {sorted(unknown)}"
    file = opts.get("file") or next((n for n in ("Containerfile", "Dockerfile")
                                     if (d / n).is_file()), "")
    assert file, f"{d.name}: no Containerfile or Dockerfile"
    return Case(d.name, d, file, opts.get("target"), opts.get("build_args", {}),
                opts.get("error"))


def load_cases() -> list[Case]:
    return [_load_case(d) for d in sorted(CORPUS.iterdir()) if d.is_dir()]


def load_divergences() -> dict[str, dict]:
    return tomllib.loads(DIVERGENCES.read_text())


CASES = load_cases()


# ------------------------------------------------------------------ building


@dataclass
class Outcome:
    """One builder's image of one case, or its error."""

    config: dict | None = None
    tree: dict[str, Entry] | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class Corpus:
    results: dict[str, tuple[Outcome, Outcome]]  # case -> (kiln, buildah)
    seconds: float
    built: int


class Builders:
    def __init__(self, work: Path, kiln_root: Path, tools, layers: LayerCache):
        self.work = work
        self.kiln_root = kiln_root
        self.tools = tools
        self.layers = layers
        self.divergences = load_divergences()

    def kiln(self, case: Case, ctx: Path) -> Outcome:
        ref = f"localhost/corpus/{case.name}:latest"
        args = [sys.executable, "-m", "kiln", "build", "-q", "--network", "none", "-t", ref,
                "-f", str(ctx / case.file)]
        args += _common_flags(case) + [str(ctx)]
        started = time.monotonic()
        p = run_tool(args, env={"KILN_ROOT": str(self.kiln_root)}, check=False,
                     timeout=BUILD_TIMEOUT, cwd=PROJECT)
        took = time.monotonic() - started
        if p.returncode != 0:
            return Outcome(error=f"exit {p.returncode}: {p.stderr.strip()}", seconds=took)
        from store.store import Store

        image = Store(self.kiln_root, create=False).image(ref)
        layers = [self.layers.ops(la.diff_id, la.open_uncompressed) for la in image.layers()]
        return Outcome(image.config().get("config") or {}, merged_view(layers), seconds=took)

    def buildah(self, case: Case, ctx: Path) -> Outcome:
        ref = f"localhost/corpus/{case.name}:latest"
        alt = self.divergences.get(case.name, {}).get("buildah_file")
        file = case.dir / alt if alt else ctx / case.file
        args = ["bud", "--runtime", "/usr/sbin/runc", "--layers", "--format", "docker",
                "--pull=never", "--network", "none", "-q", "-t", ref, "-f", str(file)]
        args += _common_flags(case) + [str(ctx)]
        started = time.monotonic()
        p = self.tools.buildah(*args, check=False)
        took = time.monotonic() - started
        if p.returncode != 0:
            return Outcome(error=f"exit {p.returncode}: {p.stderr.strip()}", seconds=took)
        out = self.work / "buildah-images" / case.name
        self.tools.skopeo("--insecure-policy", "copy", "-q", self.tools.storage_ref(ref),
                          f"dir:{out}")
        manifest = json.loads((out / "manifest.json").read_text())
        config = json.loads(_dir_blob(out, manifest["config"]["digest"]).read_bytes())
        blobs = [_dir_blob(out, la["digest"]) for la in manifest["layers"]]
        # an image of no layers (FROM scratch and metadata alone) has no diff_ids at all
        diff_ids = config["rootfs"].get("diff_ids") or []
        layers = [self.layers.ops(diff_id, partial(blob.open, "rb"))
                  for diff_id, blob in zip(diff_ids, blobs, strict=True)]
        tree = _without_run_stubs(merged_view(layers))
        shutil.rmtree(out)
        return Outcome(config.get("config") or {}, tree, seconds=took)

    def case(self, case: Case) -> tuple[Outcome, Outcome]:
        ctx = materialise(case.dir, self.work / "contexts" / case.name,
                          leave_out=_buildah_files(self.divergences.get(case.name, {})))
        return self.kiln(case, ctx), self.buildah(case, ctx)


def _common_flags(case: Case) -> list[str]:
    flags = []
    for k, v in case.build_args.items():
        flags += ["--build-arg", f"{k}={v}"]
    if case.target:
        flags += ["--target", case.target]
    return flags


def _buildah_files(rule: dict) -> tuple[str, ...]:
    return (rule["buildah_file"],) if "buildah_file" in rule else ()


def _dir_blob(out: Path, digest: str) -> Path:
    return out / digest.split(":", 1)[1]


def _without_run_stubs(tree: dict[str, Entry]) -> dict[str, Entry]:
    """buildah (as podman) creates, in every RUN layer, the mount points it bind-mounts
    over when the base lacks them: empty files, and /run holding only such stubs."""
    out = dict(tree)
    for stub in RUN_MOUNT_STUBS:
        e = out.get(stub)
        if e is None:
            continue
        if e.kind == "file" and e.size == 0:
            del out[stub]
    run = out.get("/run")
    if run is not None and run.kind == "dir" and not any(p.startswith("/run/") for p in out):
        del out["/run"]
    return out


def _selected(request) -> list[Case]:
    """The cases whose tests this session runs (all but under -k or a node id): a fixer
    running one case waits for one pair of builds."""
    names = {item.callspec.params["case"].name for item in request.session.items
             if getattr(item, "module", None) is request.module and hasattr(item, "callspec")
             and "case" in item.callspec.params}
    return [c for c in CASES if c.name in names] or CASES


@pytest.fixture(scope="module")
def corpus(request, busybox_rootfs, tmp_path_factory) -> Corpus:
    if os.geteuid() != 0:
        pytest.fail("the build corpus runs buildah and kiln builds as root: run it as root "
                    "(tests/setup-and-run.sh does), or deselect with -m 'not interop'")
    require_tool("buildah"), require_tool("skopeo"), require_tool("runc")
    cases = _selected(request)
    work = tmp_path_factory.mktemp("build-corpus")
    kiln_root = work / "kiln-root"
    env = {"KILN_ROOT": str(kiln_root)}
    kiln = [sys.executable, "-m", "kiln"]
    run_tool([*kiln, "import", str(busybox_rootfs), "busybox:latest"], env=env, cwd=PROJECT)
    archive = work / "busybox.oci.tar"
    run_tool([*kiln, "save", "-q", "busybox:latest", "-o", str(archive), "--format",
              "oci-archive"], env=env, cwd=PROJECT)
    tools = make_container_tools(work / "containers")
    try:
        tools.skopeo("--insecure-policy", "copy", "-q", f"oci-archive:{archive}:{BASE}",
                     tools.storage_ref(BASE))
        (work / "buildah-images").mkdir()
        (work / "contexts").mkdir()
        builders = Builders(work, kiln_root, tools, LayerCache())
        started = time.monotonic()
        results: dict[str, tuple[Outcome, Outcome]] = {}
        lock = threading.Lock()

        def one(case: Case) -> None:
            try:
                outcome = builders.case(case)
            except Exception:  # the harness's own failure, shown by the case's test
                import traceback

                failed = Outcome(error="harness: " + traceback.format_exc())
                outcome = (failed, failed)
            with lock:
                results[case.name] = outcome

        with ThreadPoolExecutor(WORKERS) as pool:
            for f in [pool.submit(one, c) for c in cases]:
                f.result()
        seconds = time.monotonic() - started
    finally:
        remove_container_tools(tools)
    kiln_s = sum(k.seconds for k, _ in results.values())
    buildah_s = sum(b.seconds for _, b in results.values())
    report = os.environ.get("KILN_CORPUS_REPORT")
    if report:  # every case's problems, for whoever works through KNOWN_FAILURES
        divergences = load_divergences()
        Path(report).write_text(json.dumps({
            c.name: problems(c, *results[c.name], divergences.get(c.name, {})) for c in cases
        }, indent=1))
    print(f"\nbuild corpus: {len(cases)} cases in {seconds:.1f}s with {WORKERS} workers "
          f"(kiln builds {kiln_s:.1f}s, buildah builds {buildah_s:.1f}s, summed)")
    return Corpus(results, seconds, len(cases))


# ------------------------------------------------------------------ what Docker expects


def config_view(config: dict) -> dict:
    """The compared runtime fields; absent, null and empty are the same to a user."""
    view = {f: config.get(f) or None for f in CONFIG_FIELDS}
    labels = {k: v for k, v in (view["Labels"] or {}).items() if k != "io.buildah.version"}
    view["Labels"] = labels or None
    for f in ("ExposedPorts", "Volumes"):  # sets, written as {key: {}}
        view[f] = sorted(view[f]) if view[f] else None
    if view["Healthcheck"]:  # zero durations and retries are the defaults, written or not
        view["Healthcheck"] = {k: v for k, v in view["Healthcheck"].items() if v} or None
    return view


def _entry(fields: dict, old: Entry | None, path: str) -> Entry:
    """A tree entry from a divergence rule: ``fields`` over ``old`` (or over a root-owned
    regular file). ``text`` gives a file's contents, ``target`` a symlink's."""
    import hashlib

    base = old or Entry("file", "0644", 0, 0, 0, "", (), ())
    fields = dict(fields)
    if "text" in fields:
        data = fields.pop("text").encode()
        fields.update(size=len(data), data=hashlib.sha256(data).hexdigest()[:16])
    if "target" in fields:
        fields["data"] = fields.pop("target")
        fields.setdefault("kind", "symlink")
        fields.setdefault("mode", "0777")
    if "xattrs" in fields:
        fields["xattrs"] = tuple(sorted(fields["xattrs"].items()))
    if "links" in fields:
        fields["links"] = tuple(fields["links"])
    unknown = set(fields) - set(Entry._fields)
    assert not unknown, f"DIVERGENCES.toml: {path}: unknown fields {sorted(unknown)}"
    return base._replace(**fields)


def docker_expected(rule: dict, buildah: Outcome) -> tuple[dict, dict[str, Entry]]:
    """Docker's image for a case: buildah's, changed as the case's divergence rule says."""
    assert buildah.config is not None and buildah.tree is not None
    config = config_view(buildah.config)
    for k, v in rule.get("config", {}).items():
        assert k in CONFIG_FIELDS, f"DIVERGENCES.toml: unknown config field {k}"
        config[k] = config_view({k: v})[k]
    tree = dict(buildah.tree)
    for path in rule.get("tree_absent", []):
        assert path in tree, f"DIVERGENCES.toml: {path} is not in buildah's tree"
        del tree[path]
    for path, fields in rule.get("tree", {}).items():
        tree[path] = _entry(fields, tree.get(path), path)
    return config, tree


def tree_differences(got: dict[str, Entry], want: dict[str, Entry]) -> list[str]:
    out = [f"only kiln has {k}: {got[k]}" for k in sorted(set(got) - set(want))]
    out += [f"only Docker's has {k}: {want[k]}" for k in sorted(set(want) - set(got))]
    for k in sorted(set(got) & set(want)):
        if got[k] != want[k]:
            unlike = [f"{f}: kiln {a!r} != {b!r}" for f, a, b in
                      zip(Entry._fields, got[k], want[k], strict=True) if a != b]
            out.append(f"{k}: " + ", ".join(unlike))
    return out


def config_differences(got: dict, want: dict) -> list[str]:
    return [f"config {f}: kiln {got[f]!r} != {want[f]!r}" for f in CONFIG_FIELDS
            if got[f] != want[f]]


# ------------------------------------------------------------------ the tests


def _param(case: Case):
    reason = KNOWN_FAILURES.get(case.name)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(case, id=case.name, marks=marks)


def problems(case: Case, kiln: Outcome, buildah: Outcome, rule: dict) -> list[str]:
    """How kiln's result of ``case`` differs from Docker's; [] when it does not."""
    if case.error is not None:
        out = []
        if kiln.error is None:
            out.append(f"kiln built what Docker refuses (expected an error naming {case.error!r})")
        elif ("kiln: error:" not in kiln.error or case.error not in kiln.error
              or "Traceback" in kiln.error):
            out.append(f"kiln's error is not a clear one naming {case.error!r}: {kiln.error}")
        if buildah.error is None and not rule.get("buildah_builds"):
            out.append("buildah built it: record that divergence (buildah_builds) or fix the case")
        if buildah.error is not None and rule.get("buildah_builds"):
            out.append(f"DIVERGENCES.toml says buildah builds it, but: {buildah.error}")
        return out
    if buildah.error is not None:
        return [f"buildah failed: {buildah.error}"]
    if kiln.error is not None:
        return [f"kiln failed: {kiln.error}"]
    config, tree = docker_expected(rule, buildah)
    assert kiln.config is not None and kiln.tree is not None
    return (config_differences(config_view(kiln.config), config)
            + tree_differences(kiln.tree, tree))


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_kiln_builds_what_docker_builds(corpus, case):
    kiln, buildah = corpus.results[case.name]
    rule = load_divergences().get(case.name, {})
    unlike = problems(case, kiln, buildah, rule)
    source = "buildah's image changed as DIVERGENCES.toml says" if rule else "buildah's image"
    assert not unlike, f"{case.name}: kiln's image differs from {source}:\n" + "\n".join(unlike)


def test_corpus_is_large_and_tables_name_real_cases():
    names = {c.name for c in CASES}
    assert len(CASES) >= 150, f"the corpus has {len(CASES)} cases, the issue asks for 150+"
    assert len({n.split("-", 1)[0] for n in names}) == len(names), "case numbers repeat"
    assert set(KNOWN_FAILURES) <= names, set(KNOWN_FAILURES) - names
    divergences = load_divergences()
    assert set(divergences) <= names, set(divergences) - names
    allowed = {"why", "reference", "config", "tree", "tree_absent", "buildah_file",
               "buildah_builds"}
    for name, rule in divergences.items():
        assert rule.get("why") and rule.get("reference"), f"{name}: say why, and cite"
        assert set(rule) <= allowed, f"{name}: unknown keys {set(rule) - allowed}"
        if "buildah_file" in rule:
            assert (CORPUS / name / rule["buildah_file"]).is_file()


def test_corpus_takes_minutes_not_more(corpus):
    """The corpus runs on every push: a few minutes at most for 200+ builds by each."""
    assert corpus.seconds < 420 * corpus.built / len(CASES), \
        f"{corpus.built} cases of the build corpus took {corpus.seconds:.0f}s"


def test_layer_tree_equals_umoci(tmp_path):
    """layer_tree's in-memory merge holds what umoci's real extraction of the same image
    holds: whiteouts, an opaque dir, hardlinks, xattrs, devices, odd names and owners."""
    from tests.conftest import KilnCLI
    from tests.interop.conftest import tree_view, umoci_unpack
    from tests.interop.layer_tree import _xattr_value, parse_layer
    from tests.interop.layered import LAYERED, load_layered

    kiln = KilnCLI(tmp_path / "root")
    load_layered(kiln, tmp_path)
    layout = tmp_path / "saved"
    kiln("save", "-q", LAYERED, "-o", str(layout), "--format", "oci",
         "--compression-format", "gzip")
    rootfs = umoci_unpack(layout, LAYERED, tmp_path / "bundle")

    import gzip

    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(_dir_blob(layout / "blobs" / "sha256",
                                    index["manifests"][0]["digest"]).read_text())
    ops = []
    for la in manifest["layers"]:
        with gzip.open(_dir_blob(layout / "blobs" / "sha256", la["digest"])) as f:
            ops.append(parse_layer(f))
    got = merged_view(ops)
    del got["/"]

    kinds = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK,
             "char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}
    mine = {}
    for path, e in got.items():
        what = e.data or None
        if e.kind in ("char", "block"):
            what = tuple(int(n) for n in e.data.split(","))
        mine[path] = (kinds[e.kind] | int(e.mode, 8), e.uid, e.gid, what, e.xattrs)
    umoci = {}
    for path, (mode, uid, gid, what, xattrs, _) in tree_view(rootfs).items():
        if stat.S_ISREG(int(mode, 8)):
            what = what[:16]
        umoci["/" + path] = (int(mode, 8), uid, gid, what,
                             tuple((k, _xattr_value(v)) for k, v in xattrs))
    assert mine == umoci
    grouped = [(p, e.links) for p, e in got.items() if e.links]
    assert grouped == [("/hard1", ("/hard2",)), ("/hard2", ("/hard1",))]
    assert os.stat(rootfs / "hard1").st_ino == os.stat(rootfs / "hard2").st_ino
