"""kiln build's command line as docker build's (issue 11, point 11): the Containerfile or the
context from stdin, -q, images built without -t, the output of stages that build at once,
a failing stage stopping the others, and --output archives that podman loads by name."""

from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess
import tarfile
import time

import pytest

from tests.builder.conftest import build_context as _ctx
from tests.conftest import KilnCLI
from tests.interop.conftest import container_tools, interop_dir  # noqa: F401 - fixtures

IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}\n")


def _images(kb) -> list[dict]:
    return json.loads(kb("images", "--format", "json").out)


def _rows(kb) -> list[list[str]]:
    return [line.split() for line in kb("images").out.splitlines()[1:]]


# -- the Containerfile or the whole context from stdin ----------------------------------
def test_containerfile_from_stdin_with_a_context_dir(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nRUN exit 1\n", {"f.txt": "from the context\n",
                                                       ".dockerignore": "ignored.txt\n",
                                                       "ignored.txt": "no"})
    kb("build", "-t", "stdin-file:1", "-f", "-", str(ctx),
       input=b"FROM busybox\nCOPY . /ctx/\nRUN cat /ctx/f.txt > /seen\n")
    out = kb("run", "--rm", "stdin-file:1", "sh", "-c", "cat /seen; ls /ctx").out
    # the context's files, its .dockerignore applied; not its own Containerfile
    assert out == "from the context\nContainerfile\nf.txt\n"


def test_containerfile_from_stdin_errors_name_stdin_and_the_line(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\n")
    p = kb("build", "-f", "-", str(ctx), input=b"FROM busybox\n\nRUNN echo x\n", check=False)
    assert p.returncode == 125 and p.err.startswith("kiln: error: <stdin>:3: "), p.err
    p = kb("build", "-f", "-", str(ctx), input=b"FROM busybox\nCOPY nosuch /x\n", check=False)
    assert p.returncode == 125 and "<stdin>:2: " in p.err and "Traceback" not in p.err


def test_dash_context_is_a_containerfile_from_stdin_and_an_empty_context(kb, tmp_path):
    kb("build", "-t", "stdin-only:1", "-", input=b"FROM busybox\nRUN echo made > /made\n")
    assert kb("run", "--rm", "stdin-only:1", "cat", "/made").out == "made\n"
    # nothing to copy from: as `docker build - < Dockerfile`
    p = kb("build", "-", input=b"FROM busybox\nCOPY Containerfile /x\n", check=False)
    assert p.returncode == 125 and "<stdin>:2: " in p.err and "build context" in p.err, p.err
    p = kb("build", "-f", "-", "-", input=b"FROM busybox\n", check=False)
    assert p.returncode == 125 and "stdin cannot be both" in p.err, p.err
    assert os.listdir(kb.root / "tmp") == []  # the empty context is gone


def test_dash_context_takes_a_tar_archive_as_docker_build_does(kb, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in {"other.Dockerfile": b"FROM busybox\nCOPY src/a.txt /a.txt\n",
                           "src/a.txt": b"from the tarball\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    # -f names a file of the archive
    kb("build", "-t", "stdin-tar:1", "-f", "other.Dockerfile", "-", input=buf.getvalue())
    assert kb("run", "--rm", "stdin-tar:1", "cat", "/a.txt").out == "from the tarball\n"
    p = kb("build", "-", input=buf.getvalue(), check=False)
    assert p.returncode == 125 and "no Containerfile or Dockerfile" in p.err, p.err
    assert os.listdir(kb.root / "tmp") == []


# -- -q ---------------------------------------------------------------------------------
def test_quiet_prints_only_the_image_id(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox AS one\nRUN echo run-output; echo run-error >&2\n"
                         "FROM busybox\nCOPY --from=one /etc/passwd /p\nRUN echo more\n")
    p = kb("build", "-q", "--no-cache", "-t", "quiet:1", str(ctx))
    assert IMAGE_ID.fullmatch(p.out), p.out
    assert p.err == ""
    assert p.out.strip() == "sha256:" + json.loads(kb("inspect", "quiet:1").out)[0]["Id"]


def test_quiet_build_that_fails_shows_the_steps_output_and_error_on_stderr(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nRUN echo said-before-failing; exit 3\n")
    p = kb("build", "-q", str(ctx), check=False)
    assert p.returncode == 125 and p.out == ""
    assert p.err.endswith("exited with code 3\n"), p.err
    assert "said-before-failing\n" in p.err and "STEP" not in p.err, p.err


# -- images built without -t ------------------------------------------------------------
def test_untagged_build_is_listed_as_none_and_usable_by_its_id(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nRUN echo untagged-1 > /made\n")
    image_id = kb("build", "-q", str(ctx)).out.strip().removeprefix("sha256:")
    short = image_id[:12]
    row = next(r for r in _rows(kb) if r[2] == short)
    assert row[:2] == ["<none>", "<none>"]
    assert next(r for r in _images(kb) if r["Id"] == image_id)["Names"] == []
    assert short in kb("images", "-q").out.split()
    info = json.loads(kb("inspect", short).out)[0]
    assert info["Id"] == image_id and info["RepoTags"] == []
    assert kb("run", "--rm", short, "cat", "/made").out == "untagged-1\n"
    # removing another image (which collects what nothing names) keeps it
    kb("tag", "busybox", "other-name")
    kb("rmi", "other-name")
    other = _ctx(tmp_path, "FROM busybox\nRUN echo other > /o\n", name="other")
    kb("build", "-t", "gone:1", str(other))
    kb("rmi", "gone:1")
    assert kb("run", "--rm", short, "cat", "/made").out == "untagged-1\n"
    # named, it is no longer <none>
    kb("tag", short, "named-later:1")
    assert ["<none>", "<none>", short] not in [r[:3] for r in _rows(kb)]
    assert ["docker.io/library/named-later", "1", short] in [r[:3] for r in _rows(kb)]
    kb("rmi", "named-later:1")


def test_rmi_by_id_and_prune_remove_untagged_images(kb, tmp_path):
    ids = []
    for i in range(2):
        ctx = _ctx(tmp_path, f"FROM busybox\nRUN echo dangling-{i} > /d\n", name=f"c{i}")
        ids.append(kb("build", "-q", str(ctx)).out.strip().removeprefix("sha256:"))
    # the same result again adds no second entry
    kb("build", "-q", str(tmp_path / "c0"))
    listed = [r["Id"] for r in _images(kb)]
    assert listed.count(ids[0]) == 1 and listed.count(ids[1]) == 1
    assert kb("rmi", ids[0][:12]).out.startswith("Deleted")
    assert ids[0] not in [r["Id"] for r in _images(kb)]
    p = kb("inspect", ids[0][:12], check=False)
    assert p.returncode == 125 and "not in the store" in p.err
    # kiln prune removes dangling images, as docker image prune; tagged ones stay
    out = kb("prune").out
    assert out.startswith("Removed 1 dangling images"), out
    assert ids[1] not in [r["Id"] for r in _images(kb)]
    assert "docker.io/library/busybox" in kb("images").out


# -- stages that build at once -----------------------------------------------------------
def test_output_of_parallel_stages_is_prefixed_with_the_stage(kb, tmp_path):
    ctx = _ctx(tmp_path, """\
FROM busybox AS stage-a
RUN echo hello-a; echo warn-a >&2; printf no-newline-a
FROM busybox
RUN echo hello-1
FROM busybox
COPY --from=stage-a /etc/passwd /a
COPY --from=1 /etc/passwd /b
""")
    p = kb("build", "--no-cache", str(ctx))
    out, err = p.out.splitlines(), p.err.splitlines()
    assert "[stage-a] hello-a" in out and "[stage-a] no-newline-a" in out, p.out
    assert "[1] hello-1" in out and "[stage-a] warn-a" in err, (p.out, p.err)
    assert all(line.startswith(("[stage-a] ", "[1] ")) for line in out), p.out
    assert "[stage-a] STEP 2/7: RUN echo hello-a; echo warn-a >&2; printf no-newline-a" in err
    assert "[1] STEP 4/7: RUN echo hello-1" in err


def _sleepers(token: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if token.encode() in f.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def test_a_failing_stage_stops_the_others_at_once(kb, tmp_path):
    sleep = f"30.{random.randrange(10**6, 10**7)}"  # a token for the process
    ctx = _ctx(tmp_path, f"""\
FROM busybox AS slow
RUN echo slow-started; sleep {sleep}; echo slow-done > /done
FROM busybox AS fails
RUN sleep 1; echo about-to-fail; exit 3
FROM busybox
COPY --from=slow /done /done
COPY --from=fails /etc/passwd /p
""")
    start = time.monotonic()
    p = kb("build", "--no-cache", "-t", "stopped:1", str(ctx), check=False)
    took = time.monotonic() - start
    assert p.returncode == 125, p.err
    assert took < 8, f"the build took {took:.1f}s after its stage failed"
    assert "[slow] slow-started" in p.out and "[fails] about-to-fail" in p.out, p.out
    errors = [line for line in p.err.splitlines() if line.startswith("kiln: error:")]
    assert errors == [f"kiln: error: {ctx}/Containerfile:4: step 4/7: RUN sleep 1; "
                      "echo about-to-fail; exit 3 exited with code 3"], p.err
    assert "Traceback" not in p.err and "code 137" not in p.err and "-9" not in p.err
    assert _sleepers(sleep) == []
    assert os.listdir(kb.root / "tmp") == []
    assert "stopped" not in kb("images").out


# -- --output archives ---------------------------------------------------------------------
def test_output_archives_carry_the_full_name(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nRUN echo out > /out\n")
    docker, oci = tmp_path / "d.tar", tmp_path / "o.tar"
    kb("build", "-t", "outname", "--output", f"type=docker-archive,dest={docker}",
       "--output", f"type=oci-archive,dest={oci}", str(ctx))
    with tarfile.open(docker) as t:
        manifest = json.load(t.extractfile("manifest.json"))
    assert manifest[0]["RepoTags"] == ["docker.io/library/outname:latest"]
    with tarfile.open(oci) as t:
        index = json.load(t.extractfile("index.json"))
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == (
        "docker.io/library/outname:latest")
    named = tmp_path / "named.tar"
    kb("build", "--output", f"type=docker,dest={named},name=example.com/x/y", str(ctx))
    with tarfile.open(named) as t:
        assert json.load(t.extractfile("manifest.json"))[0]["RepoTags"] == [
            "example.com/x/y:latest"]


def test_output_to_stdout_and_the_filesystem_as_a_tar(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nRUN echo run-output; echo made > /made\n")
    # the image's filesystem, streamed: stdout holds the tar and nothing else (the RUN
    # output and -q's image ID go to stderr)
    p = kb("build", "-q", "--output", "type=tar,dest=-", str(ctx))
    with tarfile.open(fileobj=io.BytesIO(p.stdout), mode="r|") as t:
        members = {m.name: (t.extractfile(m).read() if m.isfile() else None) for m in t}
    assert members["made"] == b"made\n" and "bin/busybox" in members
    assert re.search(r"sha256:[0-9a-f]{64}", p.err)
    # to a file; and an archive of the image on stdout that kiln load takes from stdin
    kb("build", "--output", f"type=tar,dest={tmp_path / 'fs.tar'}", str(ctx))
    with tarfile.open(tmp_path / "fs.tar") as t:
        assert t.extractfile("made").read() == b"made\n"
    for kind in ("docker", "oci"):
        archive = kb("build", "-t", f"piped-{kind}", "--output", f"type={kind},dest=-",
                     str(ctx)).stdout
        other = KilnCLI(tmp_path / f"other-{kind}")
        assert other("load", input=archive).out == (
            f"Loaded image: docker.io/library/piped-{kind}:latest\n")
    p = kb("build", "--output", "type=tar,dest=-", "--output", "type=oci,dest=-", str(ctx),
           check=False)
    assert p.returncode != 0 and "only one --output can go to stdout" in p.err
    p = subprocess.run(["script", "-qec", " ".join(kb.argv("build", "--output", "type=tar,dest=-",
                                                           str(ctx))), "/dev/null"],
                       capture_output=True, text=True, env=kb.environ())
    assert p.returncode == 125 and "refusing to write" in p.stdout


@pytest.mark.interop
@pytest.mark.parametrize("fmt", ["docker-archive", "oci-archive"])
def test_podman_loads_output_archives_by_their_name(kb, tmp_path, container_tools,  # noqa: F811
                                                    fmt):
    ctx = _ctx(tmp_path, f"FROM busybox\nRUN echo {fmt} > /fmt\n")
    archive = tmp_path / "out.tar"
    image_id = kb("build", "-q", "-t", f"kiln-output-{fmt}", "--output",
                  f"type={fmt},dest={archive}", str(ctx)).out.strip().removeprefix("sha256:")
    tools = container_tools
    tools.podman("rmi", "--force", image_id, check=False)
    out = tools.podman("load", "-i", str(archive)).stdout
    name = f"docker.io/library/kiln-output-{fmt}:latest"
    assert f"Loaded image: {name}" in out, out
    p = tools.podman("run", "--rm", "--network", "none", name, "/bin/busybox", "cat", "/fmt")
    assert p.stdout == f"{fmt}\n"
    tools.podman("rmi", name)


def test_bad_output_names_and_types_are_refused(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\n")
    p = kb("build", "--output", f"type=docker,dest={tmp_path}/x.tar,name=Bad_Name", str(ctx),
           check=False)
    assert p.returncode == 125 and "invalid image reference" in p.err, p.err
    p = kb("build", "--output", "type=tarball,dest=x", str(ctx), check=False)
    assert p.returncode == 125 and "type must be oci, oci-archive, docker-archive or tar" in p.err


def test_fresh_store_build_without_tag(tmp_path, busybox_rootfs):
    """The first build of a store, without -t, is the only image but busybox."""
    kb = KilnCLI(tmp_path / "root")
    kb("import", str(busybox_rootfs), "busybox")
    ctx = _ctx(tmp_path, "FROM busybox\nLABEL only=metadata\n")
    kb("build", str(ctx))
    rows = _rows(kb)
    assert len(rows) == 2 and rows[1][:2] == ["<none>", "<none>"], rows
