"""A pids limit from kiln's config file (issue 10, point 9).

Like Docker, kiln sets no pids limit by default; a machine's owner can set one for every
container (``[run] pids_limit``) and every RUN step of a build (``[build] pids_limit``) in
/etc/kiln/kiln.conf (or $XDG_CONFIG_HOME/kiln/kiln.conf, or KILN_CONFIG=FILE). A fork
bomb then stops at the limit: the container's shell counts the processes it could start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.builder.conftest import build_context
from tests.conftest import PROJECT

# PID 1 starts `sleep`s in the background until a fork fails (ash then exits), saying each
# count; the last number is how many it could start (the limit counts PID 1 too)
FORK_BOMB = "i=0; while [ $i -lt 100 ]; do sleep 30 & i=$((i+1)); echo $i; done"


def config(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "kiln.conf"
    path.write_text(text)
    return {"KILN_CONFIG": str(path)}


def forks(p) -> int:
    return int(p.out.split()[-1])


def test_the_run_pids_limit_of_the_config_file_stops_a_fork_bomb(krun, tmp_path):
    p = krun("sh", "-c", FORK_BOMB, env=config(tmp_path, "[run]\npids_limit = 64\n"))
    assert forks(p) == 63 and "can't fork" in p.err
    assert subprocess.run(["true"]).returncode == 0  # the host still forks


def test_without_a_config_file_there_is_no_pids_limit(krun, tmp_path):
    if os.path.exists("/etc/kiln/kiln.conf"):
        pytest.skip("this machine has a kiln config file")
    env = {k: v for k, v in os.environ.items() if k != "KILN_CONFIG"}
    env["XDG_CONFIG_HOME"] = str(tmp_path)  # what a non-root kiln would read: empty here
    p = krun("sh", "-c", FORK_BOMB, env=env)
    assert p.returncode == 0 and forks(p) == 100, p.err


def test_an_empty_config_file_sets_no_pids_limit(krun, tmp_path):
    p = krun("sh", "-c", FORK_BOMB, env=config(tmp_path, "# nothing set\n"))
    assert p.returncode == 0 and forks(p) == 100, p.err


@pytest.mark.parametrize("flag, want", [("20", 19), ("0", 100), ("-1", 100)])
def test_kiln_run_pids_limit_overrides_the_config_file(krun, tmp_path, flag, want):
    p = krun("sh", "-c", FORK_BOMB, opts=("--pids-limit", flag),
             env=config(tmp_path, "[run]\npids_limit = 64\n"))
    assert forks(p) == want, p.err


def test_the_build_pids_limit_applies_to_run_steps(kb, tmp_path):
    ctx = build_context(tmp_path, f"FROM busybox\nRUN {FORK_BOMB} > /forks\n")
    env = config(tmp_path, "[run]\npids_limit = 20\n[build]\npids_limit = 64\n")
    p = kb("build", "--no-cache", str(ctx), env=env, check=False)
    assert p.returncode == 125 and "can't fork" in p.err and "exited with code 2" in p.err
    # [run] alone limits no build
    env = config(tmp_path, "[run]\npids_limit = 20\n")
    kb("build", "--no-cache", "-t", "forked", str(ctx), env=env)
    assert kb("run", "--rm", "forked", "tail", "-n1", "/forks").out == "100\n"


BAD = [
    ('[run]\npids_limit = "many"\n', 2, "[run] pids_limit must be a whole number, not 'many'"),
    ("[run]\npids_limit = 1.5\n", 2, "[run] pids_limit must be a whole number, not 1.5"),
    ("[build]\n\npids_limit = true\n", 3, "[build] pids_limit must be a whole number"),
    ("[run]\npids_limit =\n", 2, "invalid value"),
    ("[run\npids_limit = 1\n", 1, "expected ']'"),
    ("# kiln\n[runn]\npids_limit = 1\n", 2, "unknown section [runn] (kiln knows [run] or "
                                             "[build] or [network])"),
    ("[run]\nmemory = 1\npids_limt = 1\n", 2, "unknown setting 'memory' in [run]"),
    ("pids_limit = 64\n", 1, "pids_limit is in no section (kiln's settings go under [run] "
                             "or [build] or [network])"),
    (b"[run]\n# caf\xe9\n", 2, "not UTF-8 text"),
]


@pytest.mark.parametrize("text, line, message", BAD, ids=[str(b[0]) for b in BAD])
@pytest.mark.parametrize("command", ["run", "build"])
def test_a_bad_config_file_is_a_clear_error(kb, tmp_path, command, text, line, message):
    path = tmp_path / "kiln.conf"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    ctx = build_context(tmp_path, "FROM busybox\nRUN true\n")
    args = ("run", "--rm", "busybox", "true") if command == "run" else ("build", str(ctx))
    p = kb(*args, env={"KILN_CONFIG": str(path)}, check=False)
    assert p.returncode == 125
    assert p.err.startswith(f"kiln: error: {path}:{line}: "), p.err
    assert message in p.err and "Traceback" not in p.err


def test_kiln_config_naming_a_missing_file_is_an_error(kb, tmp_path):
    p = kb("run", "--rm", "busybox", "true", env={"KILN_CONFIG": str(tmp_path / "none")},
           check=False)
    assert p.returncode == 125
    assert p.err == f"kiln: error: KILN_CONFIG={tmp_path / 'none'}: no such file\n"


def test_a_user_s_config_file_is_in_xdg_config_home():
    """Not root: kiln reads $XDG_CONFIG_HOME/kiln/kiln.conf (or ~/.config/kiln/kiln.conf).
    The process drops its effective uid once Python's modules (under /root) are loaded."""
    home = Path(tempfile.mkdtemp(prefix="kiln-config-"))  # where uid 65534 may look
    try:
        os.chmod(home, 0o755)
        (home / "kiln").mkdir(mode=0o755)
        (home / "kiln" / "kiln.conf").write_text("[run]\npids_limit = 99\n")
        code = ("import os, tomllib; from kiln.config import config_path, setting; "
                "os.setegid(65534); os.seteuid(65534); "
                "print(config_path(), setting('run', 'pids_limit'))")
        env = {"PATH": os.environ["PATH"], "XDG_CONFIG_HOME": str(home), "HOME": "/nonexistent"}
        p = subprocess.run([sys.executable, "-c", code], env=env, cwd=PROJECT, text=True,
                           capture_output=True)
        assert p.stdout == f"{home}/kiln/kiln.conf 99\n", p.stderr
        del env["XDG_CONFIG_HOME"]
        p = subprocess.run([sys.executable, "-c", code], env=env, cwd=PROJECT, text=True,
                           capture_output=True)
        assert p.stdout == "/nonexistent/.config/kiln/kiln.conf None\n", p.stderr
    finally:
        shutil.rmtree(home)
