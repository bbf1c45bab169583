"""`kiln build` and `buildah bud --layers` make the same image from the same Containerfile.

Both builders start from one busybox base: imported into kiln with ``kiln import``, then
handed to buildah's private storage through ``kiln save --format oci-archive`` and
``skopeo copy``, so the base layer and config are byte-identical. Each example in
Containerfiles/ is built by both; kiln's image is saved as a gzip OCI layout, buildah's is
exported by skopeo, both are unpacked by umoci, and the runtime config and merged trees
are compared.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PROJECT
from tests.interop.conftest import (
    busybox_in_kiln_and_buildah,
    differences,
    require_tool,
    run_tool,
    tree_view,
    umoci_unpack,
)

pytestmark = pytest.mark.interop

EXAMPLES = ("web", "multistage")  # every example in Containerfiles/ but bench/
PROBE = "probe"  # and a Containerfile of this file's, for what the examples never touch
CONFIG_FIELDS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "Labels", "ExposedPorts",
                 "Volumes", "StopSignal")


@dataclass
class Built:
    """One builder's image of one example: its OCI layout and what umoci unpacked."""

    layout: Path
    ref: str
    config: dict  # the image config's "config" (runtime settings)
    rootfs: Path


def _unpack(layout: Path, ref: str, where: Path) -> Built:
    # skopeo must accept the layout and resolve the ref to an image config
    run_tool([require_tool("skopeo"), "inspect", f"oci:{layout}:{ref}"])
    raw = run_tool([require_tool("skopeo"), "inspect", "--config", f"oci:{layout}:{ref}"])
    rootfs = umoci_unpack(layout, ref, where)
    return Built(layout, ref, json.loads(raw.stdout).get("config") or {}, rootfs)


@pytest.fixture(scope="module")
def builds(container_tools, busybox_rootfs, tmp_path_factory) -> dict[str, dict[str, Built]]:
    """{example: {"kiln": Built, "buildah": Built}} for every example Containerfile."""
    tools = container_tools
    work = tmp_path_factory.mktemp("build-vs-buildah")
    out: dict[str, dict[str, Built]] = {}
    with busybox_in_kiln_and_buildah(tools, busybox_rootfs, work) as kiln:
        contexts = {name: PROJECT / "Containerfiles" / name for name in EXAMPLES}
        contexts[PROBE] = _probe_context(work)
        for name, ctx in contexts.items():
            kiln_ref = f"localhost/kiln-example/{name}:latest"
            kiln("build", "-q", "--network", "none", "-t", kiln_ref, str(ctx))
            kiln_layout = work / f"kiln-{name}"
            kiln("save", "-q", kiln_ref, "-o", str(kiln_layout), "--format", "oci",
                 "--compression-format", "gzip")

            buildah_ref = f"localhost/buildah-example/{name}:latest"
            tools.buildah("bud", "--runtime", "/usr/sbin/runc", "--layers", "--pull=never",
                          "--network", "none", "-q", "-t", buildah_ref, str(ctx))
            buildah_layout = work / f"buildah-{name}"
            tools.skopeo("--insecure-policy", "copy", tools.storage_ref(buildah_ref),
                         f"oci:{buildah_layout}:{buildah_ref}")
            out[name] = {
                "kiln": _unpack(kiln_layout, kiln_ref, work / f"kiln-{name}-bundle"),
                "buildah": _unpack(buildah_layout, buildah_ref, work / f"buildah-{name}-bundle"),
            }
    return out


# The config fields the examples leave unset (Volumes, StopSignal, a numeric User...),
# deletions (whiteouts) of base files and directories, symlinks, COPY --chown/--chmod of
# files and trees, WORKDIR made by a non-root USER, ARG/ENV expansion.
PROBE_CONTAINERFILE = """\
FROM busybox
ARG VERSION=1.2
ENV APP=/opt/app PATH=/opt/app/bin:$PATH
LABEL version=$VERSION description="probe of kiln vs buildah"
WORKDIR $APP
COPY tree/ ./tree/
COPY --chown=1234:5678 --chmod=0640 a.txt b.txt files/
COPY tree $APP/tree2
RUN rm -rf /root /bin/vi && rm /etc/group && mkdir -p data/sub && echo $VERSION > data/v \\
    && ln -s data/v latest && chmod 2750 data/sub && chown 1234:5678 data/sub
USER 1234:5678
WORKDIR /home/probe
RUN touch made-by-user && mkdir own
USER root
RUN printf 'x:x:1:\\n' > /etc/group
VOLUME ["/data", "/cache"]
VOLUME /logs
EXPOSE 80 53/udp 443/tcp
STOPSIGNAL SIGQUIT
ENTRYPOINT echo probe
CMD ["--flag"]
"""
# No SHELL: buildah ignores it in OCI format ("SHELL is not supported for OCI image
# format"), and its imagebuilder hard-codes /bin/sh -c for shell-form ENTRYPOINT and CMD,
# where docker and kiln use the SHELL in force. Both are buildah's deviations.


def _probe_context(where: Path) -> Path:
    ctx = where / "probe-ctx"
    (ctx / "tree" / "deep" / "er").mkdir(parents=True)
    (ctx / "Containerfile").write_text(PROBE_CONTAINERFILE)
    for name, text, mode in (("a.txt", "a\n", 0o644), ("b.txt", "b\n", 0o755),
                             ("tree/top.sh", "#!/bin/sh\n", 0o755),
                             ("tree/deep/er/leaf", "leaf\n", 0o600)):
        (ctx / name).write_text(text)
        (ctx / name).chmod(mode)
    (ctx / "tree" / "deep").chmod(0o750)
    os.symlink("deep/er/leaf", ctx / "tree" / "to-leaf")
    os.symlink("/nonexistent", ctx / "tree" / "dangling")
    return ctx


# ------------------------------------------------------------------ normalising


def _config_view(config: dict) -> dict:
    """The compared runtime fields; absent, null and empty are the same to a user."""
    view = {f: config.get(f) or None for f in CONFIG_FIELDS}
    labels = dict(view["Labels"] or {})
    # buildah stamps its own version on every image it commits; not from the Containerfile
    labels.pop("io.buildah.version", None)
    view["Labels"] = labels or None
    # A key ENV sets again keeps its place in BuildKit (dockerfile2llb's addEnv, as the legacy
    # builder's dispatchEnv) but moves to the end in buildah (Builder.SetEnv): Env is compared
    # as a set here; tests/builder/test_scratch_workdir.py holds kiln to docker's order.
    view["Env"] = sorted(view["Env"] or []) or None
    return view


# buildah (as podman) creates, in every RUN layer, the mount points it bind-mounts over
# (/etc/hostname, /etc/hosts, /etc/resolv.conf, /run/.containerenv ...) when the base lacks
# them; they are empty placeholders, not changes the Containerfile made. kiln drops them.
RUN_MOUNT_STUBS = ("run", "run/.containerenv", "etc/hostname", "etc/hosts", "etc/resolv.conf")


def _tree(rootfs: Path, *, buildah: bool) -> dict[str, tuple]:
    view = {}
    for path, (mode, uid, gid, what, xattrs, _mtime) in tree_view(rootfs).items():
        # mtimes: buildah keeps the build host's times, kiln those of its layers; not
        # compared (the issue lists paths, types, modes, owners, contents, link targets)
        view[path] = (mode, uid, gid, what, xattrs)
    if buildah:
        for stub in RUN_MOUNT_STUBS:
            entry = view.get(stub)
            if entry is None:
                continue
            is_empty_file = stat.S_ISREG(int(entry[0], 8)) and os.path.getsize(rootfs / stub) == 0
            is_empty_dir = stat.S_ISDIR(int(entry[0], 8)) and not any(
                p.startswith(stub + "/") for p in view if p not in RUN_MOUNT_STUBS)
            if is_empty_file or is_empty_dir:
                del view[stub]
    return view


# ------------------------------------------------------------------ the comparisons


@pytest.mark.parametrize("example", [*EXAMPLES, PROBE])
def test_kiln_config_equals_buildah(builds, example):
    kiln, buildah = builds[example]["kiln"], builds[example]["buildah"]
    assert _config_view(kiln.config) == _config_view(buildah.config)


# Where kiln follows BuildKit and buildah 1.28 does not: path -> (kiln's mode, buildah's).
# The directory `COPY --chmod=0640 a.txt b.txt files/` creates takes the --chmod mode in
# BuildKit since tonistiigi/fsutil#228 (moby/buildkit#4945, #5943; Docker 28.1); buildah
# makes it 0755. tests/interop/build_corpus/DIVERGENCES.toml, 027-copy-chmod-octal-new-parent.
TREE_DIVERGENCES = {PROBE: {"opt/app/files": ("0o40640", "0o40755")}}


@pytest.mark.parametrize("example", [*EXAMPLES, PROBE])
def test_kiln_tree_equals_buildah(builds, example):
    kiln, buildah = builds[example]["kiln"], builds[example]["buildah"]
    got = _tree(kiln.rootfs, buildah=False)
    want = _tree(buildah.rootfs, buildah=True)
    for path, (kiln_mode, buildah_mode) in TREE_DIVERGENCES.get(example, {}).items():
        assert (got[path][0], want[path][0]) == (kiln_mode, buildah_mode), path
        got[path] = (buildah_mode, *got[path][1:])
    unlike = differences(got, want, got_by="kiln", want_by="buildah")
    assert not unlike, f"{example}: kiln's tree differs from buildah's:\n" + "\n".join(unlike)


def test_examples_say_something(builds):
    """The comparison is not vacuous: both trees hold what each Containerfile made."""
    web = builds["web"]["kiln"].rootfs
    st = os.lstat(web / "www" / "index.html")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert stat.S_IMODE(os.lstat(web / "usr/local/bin/selftest").st_mode) == 0o755
    assert builds["web"]["kiln"].config["User"] == "www"
    report = builds["multistage"]["buildah"].rootfs / "report"
    assert sorted(os.listdir(report)) == ["count.txt", "sorted.txt"]
    assert not (builds["multistage"]["kiln"].rootfs / "src").exists()
    probe = builds["probe"]["kiln"]
    assert not (probe.rootfs / "root").exists() and not (probe.rootfs / "bin" / "vi").exists()
    assert os.readlink(probe.rootfs / "opt/app/tree/to-leaf") == "deep/er/leaf"
    assert probe.config["StopSignal"] == "SIGQUIT"
    assert sorted(probe.config["Volumes"]) == ["/cache", "/data", "/logs"]
