"""The config a build starts from, and WORKDIR paths, as BuildKit records them.

BuildKit's emptyImage gives ``FROM scratch`` the root as WorkingDir and the default PATH, and
every stage whose base has no PATH gets that PATH appended ("make sure that PATH is always
set", dockerfile2llb). WORKDIR keeps an absolute path as written (system.NormalizeWorkdir joins
and cleans only a relative one), as the classic builder and buildah do.
"""

from __future__ import annotations

import json

from tests.builder.conftest import build_context as _ctx

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _config(kb, name: str) -> dict:
    return json.loads(kb("inspect", name).out)[0]["Config"]


def test_scratch_image_gets_the_default_path_and_the_root_as_workdir(kb, tmp_path):
    ctx = _ctx(tmp_path, "FROM scratch\nCOPY f /f\n", {"f": "x"})
    kb("build", "-q", "-t", "scratch-env:1", str(ctx))
    cfg = _config(kb, "scratch-env:1")
    assert cfg["Env"] == [DEFAULT_PATH] and cfg["WorkingDir"] == "/"
    (ctx / "Containerfile").write_text("FROM scratch\nENV A=1\n")
    kb("build", "-q", "-t", "scratch-env:2", str(ctx))
    assert _config(kb, "scratch-env:2")["Env"] == [DEFAULT_PATH, "A=1"]


def test_base_without_path_gets_the_default_one_appended(kb, broot, tmp_path):
    from store.documents import OCI_CONFIG, OCI_MANIFEST, canonical_json
    from store.store import Store

    store = Store(broot)
    busybox = store.image("busybox")
    config = busybox.config()
    config["config"] = {"Env": ["FOO=bar"], "Cmd": ["sh"]}
    config_desc = store.put_bytes(canonical_json(config), OCI_CONFIG)
    manifest = {**busybox.manifest(), "config": config_desc.to_json()}
    store.tag("nopath:1", store.put_bytes(canonical_json(manifest), OCI_MANIFEST))

    ctx = _ctx(tmp_path, "FROM nopath:1\nRUN echo \"$PATH\" > /path\n")
    kb("build", "-q", "-t", "nopath-child:1", str(ctx))
    assert _config(kb, "nopath-child:1")["Env"] == ["FOO=bar", DEFAULT_PATH]
    out = kb("run", "--rm", "nopath-child:1", "cat", "/path").out
    assert out == DEFAULT_PATH.partition("=")[2] + "\n"


def test_workdir_keeps_an_absolute_path_as_written(kb, tmp_path):
    cf = ("FROM busybox\nWORKDIR /tmp/\nRUN pwd > /pwd1\nWORKDIR sub/\nRUN pwd > /pwd2\n")
    ctx = _ctx(tmp_path, cf)
    kb("build", "-q", "-t", "wd-slash:1", str(ctx))
    assert kb("run", "--rm", "wd-slash:1", "cat", "/pwd1", "/pwd2").out == "/tmp\n/tmp/sub\n"
    (ctx / "Containerfile").write_text("FROM busybox\nWORKDIR /tmp/\n")
    kb("build", "-q", "-t", "wd-slash:2", str(ctx))
    assert _config(kb, "wd-slash:2")["WorkingDir"] == "/tmp/"
    # a relative one is joined (Go's path.Join cleans the whole result)
    (ctx / "Containerfile").write_text("FROM busybox\nWORKDIR /srv/../app/\nRUN pwd > /p\n"
                                       "WORKDIR x/../y/\n")
    kb("build", "-q", "-t", "wd-slash:3", str(ctx))
    assert _config(kb, "wd-slash:3")["WorkingDir"] == "/app/y"
    assert kb("run", "--rm", "wd-slash:3", "cat", "/p").out == "/app\n"


def test_env_set_again_keeps_its_place(kb, tmp_path):
    """BuildKit's addEnv (and buildah) replace a key where it stands in Env."""
    ctx = _ctx(tmp_path, "FROM busybox\nENV A=1 B=2\nENV A=3\nENV PATH=/x:$PATH\n")
    kb("build", "-t", "envorder:1", str(ctx))
    env = json.loads(kb("inspect", "envorder:1").out)[0]["Config"]["Env"]
    assert env == ["PATH=/x:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   "A=3", "B=2"]
