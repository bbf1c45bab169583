"""kiln build end to end: real Containerfiles, real sandboxes, the busybox base from kiln import."""

from __future__ import annotations

import json
import os
import time

from tests.builder.conftest import build_context as _ctx
from tests.conftest import KilnCLI


def _inspect(kb, name):
    return json.loads(kb("inspect", name).out)[0]


MULTI = """\
ARG BASE=busybox
FROM ${BASE} AS build
ENV GREETING="hi there" OTHER=x
WORKDIR /app
COPY src/ ./src/
RUN echo "$GREETING" > out.txt && cat src/*.txt >> out.txt
FROM busybox AS unused
RUN exit 1
FROM busybox
LABEL org.example.name="demo" version=1
COPY --from=build /app/out.txt /out.txt
EXPOSE 8080 53/udp
VOLUME /data
STOPSIGNAL SIGTERM
USER nobody
WORKDIR /srv
WORKDIR sub
ENTRYPOINT ["cat"]
CMD ["/out.txt"]
"""


def test_multi_stage_build_and_run(kb, tmp_path):
    ctx = _ctx(tmp_path, MULTI, {"src/a.txt": "hello\n", "src/b.txt": "world\n"})
    p = kb("build", "-t", "demo:1", str(ctx))
    assert "STEP 1/" in p.err and "RUN exit 1" not in p.err  # the unused stage is skipped
    assert kb("run", "--rm", "demo:1").out == "hi there\nhello\nworld\n"
    cfg = _inspect(kb, "demo:1")["Config"]
    assert cfg["Labels"] == {"org.example.name": "demo", "version": "1"}
    assert cfg["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert cfg["Volumes"] == {"/data": {}}
    assert cfg["StopSignal"] == "SIGTERM" and cfg["User"] == "nobody"
    assert cfg["WorkingDir"] == "/srv/sub"
    assert cfg["Entrypoint"] == ["cat"] and cfg["Cmd"] == ["/out.txt"]


def test_noop_rebuild_is_cached_and_identical(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nCOPY . /ctx/\nRUN touch /ran\nCMD [\"ls\", \"/ctx\"]\n",
               {f"f{i}.txt": str(i) for i in range(50)})
    first = kb("build", "-q", "-t", "c:1", str(ctx)).out.strip()
    p = kb("build", "-t", "c:1", str(ctx))
    assert p.err.count("--> CACHED") >= 2, p.err
    second = kb("build", "-q", "-t", "c:1", str(ctx)).out.strip()
    assert first == second
    os.utime(ctx / "f1.txt", (time.time() + 100, time.time() + 100))  # mtime only
    assert kb("build", "-q", "-t", "c:1", str(ctx)).out.strip() == first
    (ctx / "f1.txt").write_text("changed")
    third = kb("build", "-q", "-t", "c:1", str(ctx)).out.strip()
    assert third != first


def test_noop_rebuild_hashes_no_file(broot, tmp_path):
    from builder.engine import Builder, BuildOptions
    from store.store import Store

    ctx = _ctx(tmp_path, "FROM busybox\nCOPY . /ctx/\n", {f"d/f{i}": "x" * i for i in range(40)})
    from builder.context import RACY_WINDOW_NS

    time.sleep(RACY_WINDOW_NS / 1e9 + 0.1)  # files changed within the window are re-hashed
    store = Store(broot)
    Builder(store, BuildOptions(context=ctx, quiet=True)).build()
    b = Builder(store, BuildOptions(context=ctx, quiet=True))
    b.build()
    assert b.context.stats["files_hashed"] == 0


def test_source_date_epoch_makes_builds_reproducible(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nCOPY a /a\nRUN echo x > /b\n", {"a": "a"})
    one = kb("build", "-q", "--no-cache", "--timestamp", "1700000000", str(ctx)).out.strip()
    two = kb("build", "-q", "--no-cache", str(ctx), env={"SOURCE_DATE_EPOCH": "1700000000"}
             ).out.strip()
    assert one == two


def test_failing_run_names_step_command_and_code(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nRUN echo ok\nRUN sh -c 'exit 7'\n")
    p = kb("build", str(ctx), check=False)
    assert p.returncode == 125
    assert "Containerfile:3" in p.err and "exited with code 7" in p.err
    assert "STEP 3/3" in p.err


def test_parse_errors_name_file_and_line(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nFROBNICATE x\n")
    p = kb("build", str(ctx), check=False)
    assert p.returncode == 125 and "Containerfile:2" in p.err


def test_target_and_build_args(kb, tmp_path):
    cf = ("ARG V=default\nFROM busybox AS one\nARG V\nRUN echo $V > /v\n"
          "FROM busybox AS two\nRUN exit 1\n")
    ctx = _ctx(tmp_path, cf)
    p = kb("build", "--target", "one", "--build-arg", "V=given", "--build-arg", "UNUSED=1",
           "-t", "t:1", str(ctx))
    assert "UNUSED" in p.err  # the unused build arg is warned about
    assert kb("run", "--rm", "t:1", "cat", "/v").out == "given\n"
    p = kb("build", "--target", "nosuch", str(ctx), check=False)
    assert p.returncode == 125 and "nosuch" in p.err


def test_copy_chown_chmod_and_destination_symlinks_stay_inside(kb, tmp_path):
    cf = ("FROM busybox\nRUN ln -s /etc /link && mkdir -p /home/app && "
          "echo 'app:x:1000:1000::/home/app:/bin/sh' >> /etc/passwd && "
          "echo 'app:x:1000:' >> /etc/group\n"
          "COPY --chown=app:app --chmod=0640 f /home/app/f\nCOPY f /link/kiln-copied\n")
    ctx = _ctx(tmp_path, cf, {"f": "data"})
    kb("build", "-t", "cc:1", str(ctx))
    out = kb("run", "--rm", "cc:1", "sh", "-c",
             "stat -c '%u %g %a' /home/app/f; cat /etc/kiln-copied").out
    assert out == "1000 1000 640\ndata"
    assert not os.path.exists("/etc/kiln-copied")


def test_entrypoint_clears_inherited_cmd_and_onbuild_triggers(kb, tmp_path):
    base = _ctx(tmp_path, "FROM busybox\nCMD [\"echo\", \"base\"]\nONBUILD RUN echo trig > /t\n")
    kb("build", "-t", "ob:1", str(base))
    assert _inspect(kb, "ob:1")["Config"]["OnBuild"] == ["RUN echo trig > /t"]
    child = tmp_path / "child"
    child.mkdir()
    (child / "Containerfile").write_text("FROM ob:1\nENTRYPOINT [\"cat\", \"/t\"]\n")
    kb("build", "-t", "ob:2", str(child))
    cfg = _inspect(kb, "ob:2")["Config"]
    assert "Cmd" not in cfg and "OnBuild" not in cfg
    assert kb("run", "--rm", "ob:2").out == "trig\n"


def test_scratch_image_with_only_metadata_is_valid(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM scratch\nLABEL a=b\n")
    kb("build", "-t", "meta:1", str(ctx))
    info = _inspect(kb, "meta:1")
    assert info["Config"]["Labels"] == {"a": "b"} and len(info["Layers"]) == 1


def test_dockerignore_excludes_from_copy(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nCOPY . /c/\n",
               {"keep.txt": "k", "secret.key": "s", ".dockerignore": "*.key\n"})
    kb("build", "-t", "ig:1", str(ctx))
    out = kb("run", "--rm", "ig:1", "ls", "/c").out.split()
    assert "keep.txt" in out and "secret.key" not in out


def test_healthcheck_and_shell(kb, tmp_path):
    ctx = _ctx(tmp_path, 'FROM busybox\nSHELL ["/bin/sh", "-ec"]\n'
               "HEALTHCHECK --interval=5s --retries=2 CMD true\nRUN echo $0 > /shell\n")
    kb("build", "-t", "hc:1", str(ctx))
    cfg = _inspect(kb, "hc:1")["Config"]
    assert cfg["Healthcheck"] == {"Test": ["CMD-SHELL", "true"], "Interval": 5_000_000_000,
                                  "Retries": 2}
    assert cfg["Shell"] == ["/bin/sh", "-ec"]



def test_run_heredoc_script(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nRUN <<EOF\necho one > /h\necho two >> /h\nEOF\n")
    kb("build", "-t", "hd:1", str(ctx))
    assert kb("run", "--rm", "hd:1", "cat", "/h").out == "one\ntwo\n"


def test_squash_and_outputs(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nRUN echo a > /a\nRUN rm /bin/vi && echo b > /b\n")
    kb("build", "--squash", "-t", "sq:1", "--output", f"type=oci,dest={tmp_path / 'o.tar'}",
       "--output", f"type=docker-archive,dest={tmp_path / 'd.tar'}",
       "--output", f"type=oci,dest={tmp_path / 'odir'}", str(ctx))
    info = _inspect(kb, "sq:1")
    assert len(info["Layers"]) == 1
    assert sum(1 for h in info["History"] if not h.get("empty_layer")) == 1
    out = kb("run", "--rm", "sq:1", "sh", "-c", "cat /a /b; ls /bin/vi 2>&1 || true").out
    assert out.startswith("a\nb\n") and "No such file" in out
    for path in ("o.tar", "d.tar", "odir"):
        fresh = KilnCLI(tmp_path / f"load-{path}")
        assert "docker.io/library/sq:1" in fresh("load", "-i", str(tmp_path / path)).out


def test_bad_output_and_secret_flags(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\n")
    p = kb("build", "--output", "type=tarball,dest=x", str(ctx), check=False)
    assert p.returncode == 125 and "type must be oci, oci-archive, docker-archive or tar" in p.err
    p = kb("build", "--secret", "id=x", str(ctx), check=False)
    assert p.returncode == 125 and "src= or env=" in p.err


def test_platform_args_reach_run_when_declared(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nARG TARGETARCH\nARG TARGETOS\n"
               "RUN echo $TARGETOS/$TARGETARCH > /p\n")
    kb("build", "-t", "pa:1", str(ctx))
    out = kb("run", "--rm", "pa:1", "cat", "/p").out
    assert out.startswith("linux/") and out.strip() != "linux/"


def test_independent_stages_build_at_the_same_time(kb, tmp_path):
    cf = ("FROM busybox AS a\nRUN sleep 2 && echo a > /a\n"
          "FROM busybox AS b\nRUN sleep 2 && echo b > /b\n"
          "FROM busybox\nCOPY --from=a /a /a\nCOPY --from=b /b /b\n")
    ctx = _ctx(tmp_path, cf)
    start = time.monotonic()
    kb("build", "--no-cache", "-t", "par:1", str(ctx))
    elapsed = time.monotonic() - start
    assert kb("run", "--rm", "par:1", "cat", "/a", "/b").out == "a\nb\n"
    assert elapsed < 3.6, elapsed  # two 2 s stages one after the other would take 4 s+


def test_global_args_need_redeclaring_and_proxy_args_stay_out_of_history(kb, tmp_path):
    cf = ("ARG G=global\nFROM busybox\nRUN echo \"[$G]\" > /g && echo \"$HTTP_PROXY\" > /p\n"
          "ARG G\nRUN echo \"[$G]\" > /g2\n")
    ctx = _ctx(tmp_path, cf)
    kb("build", "-t", "ga:1", "--build-arg", "HTTP_PROXY=http://proxy.invalid:3128",
       str(ctx))
    out = kb("run", "--rm", "ga:1", "cat", "/g", "/p", "/g2").out
    assert out == "[]\nhttp://proxy.invalid:3128\n[global]\n"
    history = json.dumps(_inspect(kb, "ga:1")["History"])
    assert "proxy.invalid" not in history
    # a different proxy is not a different step: cached, same image
    p = kb("build", "-t", "ga:1", "--build-arg", "HTTP_PROXY=http://other.invalid:1", str(ctx))
    assert p.err.count("--> CACHED") == 2, p.err


def test_no_layers_merges_a_stages_steps_into_one_layer(kb, tmp_path):
    cf = ("FROM busybox\nRUN echo a > /a && mkdir -p /d && echo x > /d/x\n"
          "RUN rm /bin/vi /d/x && echo b > /b\nCOPY f /f\nRUN chmod 600 /f\n")
    ctx = _ctx(tmp_path, cf, {"f": "file"})
    kb("build", "--no-layers", "-t", "nl:1", str(ctx))
    info = _inspect(kb, "nl:1")
    assert len(info["Layers"]) == 2  # the base's, plus one for all four steps
    assert sum(1 for h in info["History"] if not h.get("empty_layer")) == 2
    out = kb("run", "--rm", "nl:1", "sh", "-c",
             "cat /a /b /f; ls /d | wc -l; ls /bin/vi 2>&1; stat -c %a /f").out
    assert out.startswith("a\nb\nfile0\n") and "No such file" in out and out.endswith("600\n")


def test_maintainer_legacy_env_and_healthcheck_none(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM busybox\nMAINTAINER Jane Doe <jane@example.com>\n"
               "ENV LEGACY value with spaces\nHEALTHCHECK CMD true\nHEALTHCHECK NONE\n")
    kb("build", "-t", "misc:1", str(ctx))
    info = _inspect(kb, "misc:1")
    assert info["Author"] == "Jane Doe <jane@example.com>"
    assert "LEGACY=value with spaces" in info["Config"]["Env"]
    assert info["Config"]["Healthcheck"] == {"Test": ["NONE"]}


def test_prune_build_cache_frees_cached_layers(tmp_path, busybox_rootfs):
    kb = KilnCLI(tmp_path / "root")
    kb("import", str(busybox_rootfs), "busybox")
    ctx = _ctx(tmp_path, "FROM busybox\nRUN --mount=type=cache,target=/c echo x > /c/f\n"
               "RUN echo big > /big\n")
    kb("build", str(ctx))  # untagged: only the cache keeps its layers
    kb("prune")
    assert len(os.listdir(tmp_path / "root" / "layers")) == 3  # busybox + the two steps
    assert "--> CACHED" in kb("build", str(ctx)).err
    out = kb("prune", "--build-cache").out
    assert "build cache entries" in out
    assert len(os.listdir(tmp_path / "root" / "layers")) == 1  # busybox only
    assert not os.listdir(tmp_path / "root" / "cache-mounts")
    assert "--> CACHED" not in kb("build", str(ctx)).err
