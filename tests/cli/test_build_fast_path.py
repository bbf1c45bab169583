"""`kiln build` parses its plain command lines without click (a no-op rebuild is mostly
start-up): it must read them exactly as click would, and leave everything else to click."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from builder.context import RACY_WINDOW_NS
from tests.cli.test_run_fast_path import (
    _imported_by,
    check_fast_parse_is_click_parse,
    fast_parse,
)
from tests.conftest import PROJECT


def _fast_parse(args: list[str], monkeypatch, env_root: str | None):
    return fast_parse(args, monkeypatch, env_root, "parse_build_args")


ACCEPTED = [
    ["build"],
    ["build", "."],
    ["build", "-t", "a", "--tag", "b", "-tc", "--tag=d", "ctx"],
    ["build", "ctx", "-t", "x", "-q"],  # click takes options after the argument too
    ["build", "-q", "-f", "ctx/Containerfile.alt", "--build-arg", "A=1", "--build-arg=B",
     "--target", "final", "--no-cache", "--network", "none", "--compression-format", "gzip",
     "--timestamp", "0", "--iidfile", "/tmp/iid", "--squash", "ctx"],
    ["build", "--no-layers", "--layers", "--no-layers", "."],
    ["build", "--layers", "."],
    ["build", "--pull", "."],
    ["build", "--pull", "never", "."],
    ["build", "--pull=Newer", "."],
    ["build", "--pull", "True", "."],
    ["build", "--pull=false", "."],
    ["build", "-qt", "x", "--timestamp", " 42 ", "-"],
    ["build", "-f", "-", "ctx"],
    ["build", "-t", "--pull", "ctx"],
    ["build", "--", "-ctx"],
    ["build", "-t", "x", "--", "--pull"],
    ["build", "--target", "-q", "--iidfile=", "ctx"],
]


@pytest.mark.parametrize("args", ACCEPTED, ids=[" ".join(a) for a in ACCEPTED])
@pytest.mark.parametrize("how", ["env", "flag", "flag=", "default"])
def test_fast_parse_is_what_click_parses(args, how, monkeypatch, tmp_path):
    check_fast_parse_is_click_parse(args, how, monkeypatch, tmp_path,
                                    runner="kiln.build_run.build_image",
                                    parser="parse_build_args")


REJECTED = [
    ["build", "--help"], ["build", "-h"], ["build", "a", "b"], ["build", "--bogus"],
    ["build", "--no-cache=1"], ["build", "--network", "bridge"], ["build", "--network=HOST"],
    ["build", "--compression-format", "xz"], ["build", "--timestamp", "soon"],
    ["build", "--pull=sometimes"], ["build", "-t"], ["build", "-qz"],
    ["build", "--secret", "id=a,src=/f", "."], ["build", "--output", "type=oci,dest=d"],
    ["build", "--sign-key", "k"], ["build", "--verify-key", "k"], ["build", "--creds", "u:p"],
    ["build", "--tls-verify=false"], ["build", "--jobs", "2"], ["images"], ["run", "build"],
    ["--root", "/r"], ["--roo", "/r", "build"],
]


@pytest.mark.parametrize("args", REJECTED, ids=[" ".join(a) for a in REJECTED])
def test_anything_else_is_left_to_click(args, monkeypatch):
    assert _fast_parse(args, monkeypatch, None) is None


def test_build_options_are_those_of_the_click_command():
    import click

    from kiln.build_commands import build_cmd
    from kiln.cli import BUILD_CHOICES, BUILD_DEFAULTS, BUILD_OPTIONS

    options, defaults, choices = {}, {}, {}
    for param in build_cmd.params:
        if not isinstance(param, click.Option) or param.name == "help":
            continue
        kind = "flag" if param.is_flag else "multiple" if param.multiple else "value"
        for opt in param.opts:
            options[opt] = (param.name, kind)
        for opt in param.secondary_opts:
            options[opt] = (param.name, "off")
        default = param.default  # click's flags default to a sentinel: False
        if isinstance(default, (str, int)) and default is not False:
            defaults[param.name] = default
        if isinstance(param.type, click.Choice):
            choices[param.name] = tuple(param.type.choices)
    fast = {opt: spec for opt, spec in options.items() if opt in BUILD_OPTIONS}
    assert fast == BUILD_OPTIONS
    slow = {dest for opt, (dest, _) in options.items() if opt not in BUILD_OPTIONS}
    assert slow == {k for k, v in BUILD_DEFAULTS.items()
                    if k not in {dest for dest, _ in BUILD_OPTIONS.values()}}
    assert defaults == {
        k: v for k, v in BUILD_DEFAULTS.items() if v not in (None, False, ())}
    assert choices == BUILD_CHOICES
    assert [p.name for p in build_cmd.params if isinstance(p, click.Argument)] == ["context"]


@pytest.mark.skipif(os.geteuid() != 0, reason="builds with RUN")
def test_a_no_op_rebuild_starts_without_click(kiln, busybox_rootfs, tmp_path):
    kiln("import", str(busybox_rootfs), "busybox")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text("FROM busybox\nRUN echo hi > /f\nCOPY . /src\n")
    # a file changed in the last 2 s is hashed again by every build (its stat could hide a
    # change) and the stat cache written again: wait, so that the rebuild is a true no-op
    time.sleep(RACY_WINDOW_NS / 1e9 + 0.2)
    args = ["build", "-q", "-t", "fast", str(ctx)]
    kiln(*args)
    imported = _imported_by(args, kiln.root)
    assert "click" not in imported
    for heavy in ("tarfile", "bz2", "lzma", "difflib", "requests", "urllib3"):
        assert heavy not in imported, f"a no-op kiln build imported {heavy}"
    assert "click" in _imported_by(["build", "--help"], kiln.root)


@pytest.mark.parametrize("args, message", [
    (["build", "/nonexistent/ctx"],
     "kiln: error: build context /nonexistent/ctx is not a directory "
     "(see 'kiln build --help')\n"),
    (["build", "-t", "Bad Name", "."], None),
])
def test_fast_path_errors_are_click_path_errors(args, message, tmp_path):
    """The same mistake on either path: the same line, exit 125 (--secret forces click)."""
    env = {**os.environ, "KILN_ROOT": str(tmp_path / "root")}
    fast = subprocess.run([sys.executable, "-m", "kiln", *args], capture_output=True,
                          text=True, env=env, cwd=PROJECT)
    slow = subprocess.run([sys.executable, "-m", "kiln", *args, "--secret", "id=x,env=HOME"],
                          capture_output=True, text=True, env=env, cwd=PROJECT)
    assert fast.returncode == slow.returncode == 125
    assert fast.stderr == slow.stderr
    if message is not None:
        assert fast.stderr == message
