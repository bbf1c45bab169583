"""`kiln run` parses its arguments without click: it must read them exactly as click would,
and leave everything it does not know to click."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import PROJECT


class _Ran(Exception):
    pass


def _use_root(monkeypatch, env_root: str | None) -> None:
    if env_root is None:
        monkeypatch.delenv("KILN_ROOT", raising=False)
    else:
        monkeypatch.setenv("KILN_ROOT", env_root)


def _click_parse(args: list[str], monkeypatch, env_root: str | None,
                 runner: str = "kiln.cli.run_and_exit"):
    """What the click command hands to ``runner`` (a (store, params) function) for
    ``args``: (root, params)."""
    import kiln.cli

    seen = {}

    def capture(store, params):
        seen["root"], seen["params"] = str(store.root), params
        raise _Ran

    monkeypatch.setattr(runner, capture)
    _use_root(monkeypatch, env_root)
    with pytest.raises(_Ran):
        kiln.cli._click_main(list(args))
    return seen["root"], seen["params"]


def fast_parse(args: list[str], monkeypatch, env_root: str | None,
               parser: str = "parse_run_args"):
    import kiln.cli

    _use_root(monkeypatch, env_root)
    return getattr(kiln.cli, parser)(list(args))


def check_fast_parse_is_click_parse(args: list[str], how: str, monkeypatch, tmp_path, *,
                                    runner: str = "kiln.cli.run_and_exit",
                                    parser: str = "parse_run_args") -> None:
    """kiln.cli's ``parser`` reads ``args`` (after a --root given as ``how`` says) into
    exactly what click hands ``runner``: the same root, parameters and their types."""
    root = str(tmp_path / "root")
    env_root = root if how == "env" else None
    full = {"flag": ["--root", root], "flag=": [f"--root={root}"]}.get(how, []) + args
    if how == "default":  # the default root: /var/lib/kiln as root; never made by this test
        monkeypatch.setattr("store.store.Store.__init__", _fake_store_init)
    want_root, want = _click_parse(full, monkeypatch, env_root, runner)
    got = fast_parse(full, monkeypatch, env_root, parser)
    assert got is not None, "the fast path should take this command line"
    got_root, got_params = got
    if how == "default":
        assert got_root is None
    else:
        assert os.path.abspath(got_root) == want_root
    assert got_params == want
    assert {k: type(v) for k, v in got_params.items()} == {k: type(v) for k, v in want.items()}


ACCEPTED = [
    ["run", "img"],
    ["run", "--rm", "img", "true"],
    ["run", "-it", "--rm", "-e", "A=1", "-eB=2", "--env=C=3", "-e=D", "-v", "/tmp:/x:ro",
     "--volume=/tmp:/y", "--name", "n1", "img", "sh", "-c", "echo --rm -e"],
    ["run", "--", "img", "--rm"],
    ["run", "--rm", "--", "--img", "x"],
    ["run", "--rm", "img", "--", "x", "--name", "y"],
    ["run", "-w", "/w", "-u", "1000:1000", "-h", "host", "-m", "64m", "--memory-swap", "-1",
     "--cpus", "0.5", "-c", "512", "--pids-limit", "10", "--stop-timeout", "2.5", "img"],
    ["run", "--net", "host", "--cap-add", "NET_ADMIN", "--cap-drop", "ALL", "--cap-add=chown",
     "--security-opt", "seccomp=unconfined", "--security-opt=no-new-privileges",
     "--privileged", "--init", "--read-only", "--tmpfs", "/t", "--tmpfs=/u:size=1m",
     "--entrypoint", "", "img"],
    ["run", "--entrypoint=", "--network=none", "img", "a", "b"],
    ["run", "-ti", "-eX=1", "-ite", "Y=2", "img"],
    ["run", "--name", "-x", "--hostname", "--rm", "img"],
    ["run", "--name", "a", "--name", "b", "--stop-timeout", "inf", "--stop-timeout", " 3 ",
     "img"],
    ["run", "-", "cmd"],
    ["run", "--rm", "--env-file", "/nonexistent/env", "img"],
    ["run", "-w", "--", "img"],
]


@pytest.mark.parametrize("args", ACCEPTED, ids=[" ".join(a) for a in ACCEPTED])
@pytest.mark.parametrize("how", ["env", "flag", "flag=", "default"])
def test_fast_parse_is_what_click_parses(args, how, monkeypatch, tmp_path):
    check_fast_parse_is_click_parse(args, how, monkeypatch, tmp_path)


def _fake_store_init(self, root=None, *, create=True):
    from pathlib import Path

    from store.store import default_root

    self.root = Path(root if root is not None else default_root())


REJECTED = [
    ["run", "--help"], ["run"], ["run", "--rm"], ["run", "--bogus", "img"],
    ["run", "--rm=1", "img"],
    ["run", "--stop-timeout", "soon", "img"], ["run", "--name"], ["run", "-x", "img"],
    ["run", "-iz", "img"], ["--version"], ["--help"], ["images"], ["--root"], ["-h", "run"],
    ["--root", "/r"], ["--roo", "/r", "run", "img"], ["ps", "run"], ["--root", "/r", "ps"],
]


@pytest.mark.parametrize("args", REJECTED, ids=[" ".join(a) for a in REJECTED])
def test_anything_else_is_left_to_click(args, monkeypatch):
    assert fast_parse(args, monkeypatch, None) is None


def test_an_unreadable_env_file_is_left_to_click(tmp_path, monkeypatch):
    env_file = tmp_path / "env"
    env_file.write_text("A=1\n")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert fast_parse(["run", "--env-file", str(env_file), "img"], monkeypatch, None) is None


def _click_options(command) -> tuple[dict, dict]:
    import click

    want = {}
    defaults = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name == "help":
            continue
        kind = "flag" if param.is_flag else "multiple" if param.multiple else "value"
        for opt in [*param.opts, *param.secondary_opts]:
            want[opt] = (param.name, kind)
        if kind == "value" and param.default is not None:
            defaults[param.name] = param.default
    return want, defaults


def test_run_options_are_those_of_the_click_command():
    import click

    from kiln.cli import RUN_DEFAULTS, RUN_OPTIONS
    from kiln.container_commands import run_cmd

    want, defaults = _click_options(run_cmd)
    assert want == RUN_OPTIONS
    assert defaults == RUN_DEFAULTS
    assert [p.name for p in run_cmd.params if isinstance(p, click.Argument)] == ["image",
                                                                                 "command"]


def _imported_by(args: list[str], root, env: dict[str, str] | None = None) -> set[str]:
    """Modules ``kiln ARGS`` imports beyond what the interpreter's start-up imports here
    (the editable install's path hook brings pathlib and more; a pip install does not)."""
    env = {**os.environ, "KILN_ROOT": str(root), **(env or {})}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    found = []
    for argv in ([sys.executable, "-X", "importtime", "-c", "pass"],
                 [sys.executable, "-X", "importtime", "-m", "kiln", *args]):
        p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=PROJECT)
        assert p.returncode == 0, p.stderr
        found.append({line.split("|")[-1].strip() for line in p.stderr.splitlines()
                      if line.startswith("import time:")})
    return found[1] - found[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a container")
def test_kiln_run_starts_without_click_or_the_store_model(kiln, busybox_rootfs):
    kiln("import", str(busybox_rootfs), "busybox")
    first = _imported_by(["run", "--rm", "busybox", "true"], kiln.root)
    assert "click" not in first
    heavy = ("click", "dataclasses", "store.store", "store.documents", "runtime.seccomp",
             "pathlib", "hashlib", "typing", "socket", "shutil", "tempfile", "signal",
             "subprocess", "tomllib")  # the config file's parser: only when there is one
    again = _imported_by(["run", "--rm", "--network", "none", "busybox", "true"], kiln.root)
    for module in (*heavy, "json", "runtime.network.networks"):
        assert module not in again, f"kiln run --network none imported {module}"
    # the default bridge network reads its leases (json), nothing more; nft only for -p
    again = _imported_by(["run", "--rm", "busybox", "true"], kiln.root)
    assert "runtime.network.netlink" in again
    for module in heavy:
        assert module not in again, f"kiln run imported {module}"
    assert "click" in _imported_by(["run", "--help"], kiln.root)


def test_exec_goes_without_click_with_the_click_commands_options(monkeypatch):
    import click

    from kiln.cli import EXEC_OPTIONS, parse_exec_args
    from kiln.container_commands import exec_cmd

    want, defaults = _click_options(exec_cmd)
    assert want == EXEC_OPTIONS and defaults == {}
    assert [p.name for p in exec_cmd.params if isinstance(p, click.Argument)] == [
        "container", "command"]
    monkeypatch.delenv("KILN_ROOT", raising=False)
    root, params = parse_exec_args(["--root", "/r", "exec", "-it", "-u", "app", "-e", "A=1",
                                    "c1", "sh", "-c", "echo -u"])
    assert root == "/r" and params["container"] == "c1"
    assert params["command"] == ("sh", "-c", "echo -u")
    assert (params["tty"], params["interactive"], params["user"], params["env"]) == (
        True, True, "app", ("A=1",))
    for rejected in (["exec", "c1"], ["exec", "--help"], ["exec", "--nosuch", "c1", "true"]):
        assert parse_exec_args(rejected) is None
