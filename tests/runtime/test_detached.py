"""Detached containers: kiln run -d, ps, logs, exec, stop, kill, wait, --restart."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from tests.runtime.conftest import kiln_argv

TRAP_TERM = "trap 'echo got-term; exit 0' TERM; echo ready; while :; do sleep 0.05; done"


@pytest.fixture
def detached(krun):
    """kiln run -d ... -> the ID; every container it started is removed at the end."""
    cli = krun.cli
    made = []

    def run(*args: str, check: bool = True):
        t = time.monotonic()
        p = cli("run", "-d", *args, check=check)
        p.seconds = time.monotonic() - t
        if p.returncode == 0:
            made.append(p.out.strip())
        return p

    run.cli = cli
    run.root = krun.cli.root
    yield run
    for cid in made:
        cli("rm", "-f", cid, check=False)


def _until(fn, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def _state(cli, cid: str) -> dict:
    return next(c for c in json.loads(cli("ps", "-a", "--format", "json").out)
                if c["id"] == cid)


def test_run_d_returns_at_once_and_keeps_the_container(detached):
    p = detached("probe", "sh", "-c", "echo to-out; echo to-err >&2; sleep 30")
    cid = p.out.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", cid) and p.err == ""
    assert p.seconds < 5  # subprocess.run returned: nothing of the container held its pipes
    ps = detached.cli("ps").out
    assert cid[:12] in ps and "Up" in ps
    logs = _until(lambda: detached.cli("logs", cid[:12]) if "to-out" in
                  detached.cli("logs", cid[:12]).out else None)
    assert logs.out == "to-out\n" and logs.err == "to-err\n"  # each on its own stream
    stamped = detached.cli("logs", "-t", "--tail", "1", cid).out + \
        detached.cli("logs", "-t", "--tail", "1", cid).err
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z to-", stamped), stamped
    assert detached.cli("logs", "--tail", "0", cid).out == ""
    state = _state(detached.cli, cid)
    assert state["status"] == "running" and state["monitor"] and state["pid"]


def test_exit_code_wait_and_logs_follow(detached):
    cid = detached("probe", "sh", "-c", "for i in 1 2 3; do echo line$i; sleep 0.2; done; "
                   "exit 3").out.strip()
    follow = detached.cli("logs", "-f", cid)  # returns when the container has exited
    assert follow.out == "line1\nline2\nline3\n"
    assert detached.cli("wait", cid).out == "3\n"
    assert "Exited (3)" in detached.cli("ps", "-a").out
    assert _state(detached.cli, cid)["exit_code"] == 3


def test_stop_sends_term_then_kill(detached):
    cid = detached("probe", "sh", "-c", TRAP_TERM).out.strip()
    _until(lambda: "ready" in detached.cli("logs", cid).out)
    t = time.monotonic()
    assert detached.cli("stop", cid).out == f"{cid}\n"
    assert time.monotonic() - t < 5
    assert "got-term" in detached.cli("logs", cid).out
    assert _state(detached.cli, cid)["exit_code"] == 0
    # PID 1 without a TERM handler ignores it: killed after -t seconds, 137 as docker says
    cid = detached("probe", "sleep", "60").out.strip()
    t = time.monotonic()
    detached.cli("stop", "-t", "1", cid)
    assert 0.9 < time.monotonic() - t < 6
    assert _state(detached.cli, cid)["exit_code"] == 137
    assert detached.cli("stop", cid).returncode == 0  # stopping a stopped one is fine


def test_kill_with_a_signal(detached):
    cid = detached("probe", "sh", "-c", "trap 'echo got-usr1' USR1; echo ready; "
                   "while :; do sleep 0.05; done").out.strip()
    _until(lambda: "ready" in detached.cli("logs", cid).out)
    detached.cli("kill", "-s", "USR1", cid)
    _until(lambda: "got-usr1" in detached.cli("logs", cid).out)
    detached.cli("kill", cid)
    assert detached.cli("wait", cid).out == "137\n"
    p = detached.cli("kill", cid, check=False)
    assert p.returncode == 125 and "is not running" in p.err
    p = detached.cli("kill", "-s", "NOSUCH", cid, check=False)
    assert p.returncode == 125 and "invalid signal 'NOSUCH'" in p.err


def test_exec_is_confined_like_the_container(detached):
    cid = detached("--name", f"ex{os.getpid()}", "--cap-drop", "NET_RAW",
                   "--security-opt", "no-new-privileges", "probe", "sh", "-c",
                   "grep -E '^(Cap|NoNewPrivs|Seccomp)' /proc/self/status > /tmp/pid1; "
                   "cat /proc/self/cgroup > /tmp/cg1; echo ready; sleep 30").out.strip()
    _until(lambda: "ready" in detached.cli("logs", cid).out)
    cli = detached.cli
    p = cli("exec", cid, "sh", "-c", "grep -E '^(Cap|NoNewPrivs|Seccomp)' /proc/self/status")
    assert p.out == cli("exec", cid, "cat", "/tmp/pid1").out  # same caps, nnp, seccomp
    assert "NoNewPrivs:\t1" in p.out and "Seccomp:\t2" in p.out
    assert cli("exec", cid, "cat", "/proc/self/cgroup").out == \
        cli("exec", cid, "cat", "/tmp/cg1").out  # in the container's cgroup
    assert cli("exec", cid, "cat", "/proc/1/cmdline").out == "sleep\x0030\x00"  # its PID 1
    assert cli("exec", cid, "hostname").out == f"{cid[:12]}\n"
    p = cli("exec", "-u", "app", "-w", "/tmp", "-e", "X=1", cid, "sh", "-c",
            "id -u; pwd; echo $X")
    assert p.out == "1000\n/tmp\n1\n"
    assert cli("exec", cid, "sh", "-c", "exit 7", check=False).returncode == 7
    p = cli("exec", cid, "nosuchcmd", check=False)
    assert p.returncode == 127 and "nosuchcmd: executable file not found" in p.err
    p = cli("exec", f"ex{os.getpid()}", "cat", "/etc/hostname")  # by name too
    assert p.out == f"{cid[:12]}\n"
    cli("kill", cid)
    cli("wait", cid)
    p = cli("exec", cid, "true", check=False)
    assert p.returncode == 125 and "is not running" in p.err


def test_start_errors_are_reported_and_leave_nothing(detached):
    before = detached.cli("ps", "-a", "-q").out
    p = detached("probe", "nosuchcmd", check=False)
    assert p.returncode == 127 and "nosuchcmd: executable file not found" in p.err
    p = detached("nosuchimage", "true", check=False)
    assert p.returncode == 125 and "nosuchimage" in p.err
    p = detached("--restart", "sometimes", "probe", "true", check=False)
    assert p.returncode == 125 and "invalid --restart 'sometimes'" in p.err
    p = detached.cli("run", "--restart", "always", "probe", "true", check=False)
    assert p.returncode == 125 and "--restart needs -d" in p.err
    assert detached.cli("ps", "-a", "-q").out == before


def test_rm_and_restart_policies(detached):
    cid = detached("--rm", "probe", "true").out.strip()
    _until(lambda: cid[:12] not in detached.cli("ps", "-a", "-q").out)
    cid = detached("--restart", "on-failure:2", "probe", "sh", "-c", "exit 5").out.strip()
    _until(lambda: _state(detached.cli, cid)["status"] == "exited"
           and _state(detached.cli, cid)["restart_count"] == 2)
    time.sleep(0.5)
    assert _state(detached.cli, cid)["restart_count"] == 2  # and no third
    cid = detached("--restart", "always", "probe", "sh", "-c", "echo run; sleep 0.1").out.strip()
    _until(lambda: detached.cli("logs", cid).out.count("run") >= 3)
    detached.cli("stop", cid)
    count = _state(detached.cli, cid)["restart_count"]
    time.sleep(1)
    assert _state(detached.cli, cid)["restart_count"] == count  # a stop is final
    assert _state(detached.cli, cid)["status"] == "exited"


def test_killing_the_monitor_ends_the_container(detached):
    cid = detached("probe", "sleep", "60").out.strip()
    state = _state(detached.cli, cid)
    os.kill(state["monitor"], signal.SIGKILL)
    _until(lambda: not os.path.exists(f"/proc/{state['pid']}"))
    assert "Exited" in detached.cli("ps", "-a").out


def test_pause_top_stats_inspect(detached):
    cli = detached.cli
    cid = detached("--name", f"pz{os.getpid()}", "-m", "64m", "probe", "sh", "-c",
                   "while :; do date +%s%N > /tmp/tick; sleep 0.05; done").out.strip()
    _until(lambda: cli("exec", cid, "test", "-e", "/tmp/tick", check=False).returncode == 0)
    cli("pause", cid)
    assert "Up (Paused)" in cli("ps").out
    info = json.loads(cli("inspect", cid).out)[0]
    assert info["State"]["Status"] == "paused" and info["State"]["Paused"] is True
    p = cli("exec", cid, "true", check=False)
    assert p.returncode == 125 and "is paused" in p.err
    p = cli("pause", cid, check=False)
    assert p.returncode == 125 and "already paused" in p.err
    cli("unpause", cid)
    first = cli("exec", cid, "cat", "/tmp/tick").out
    _until(lambda: cli("exec", cid, "cat", "/tmp/tick").out != first)  # it runs again
    top = cli("top", cid).out.splitlines()
    assert top[0].split() == ["UID", "PID", "PPID", "TIME", "CMD"]
    assert any(line.endswith("sh -c while :; do date +%s%N > /tmp/tick; sleep 0.05; done")
               for line in top) and len(top) <= 4  # its processes only, not the host's
    stats = json.loads(cli("stats", "--no-stream", "--format", "json", cid).out)[0]
    assert stats["MemLimit"] == 64 << 20 and 0 < stats["MemUsage"] < 64 << 20
    assert stats["PIDs"] >= 1
    # a busy second container: both sampled over the same interval; without --no-stream
    # a new sample every second until interrupted
    busy = detached("probe", "sh", "-c", "while :; do :; done").out.strip()
    stream = subprocess.Popen(kiln_argv(detached.root, "stats", cid, busy),
                              stdout=subprocess.PIPE, text=True)
    try:
        lines = [stream.stdout.readline() for _ in range(6)]
    finally:
        stream.kill()
        stream.wait()
    assert [line.split()[0] for line in lines] == ["CONTAINER", cid[:12], busy[:12]] * 2
    cpu = {line.split()[0]: float(line.split()[2]) for line in lines[4:]}
    assert cpu[busy[:12]] > 50 and cpu[cid[:12]] < cpu[busy[:12]]
    info = json.loads(cli("inspect", "--type", "container", f"pz{os.getpid()}").out)[0]
    assert info["Id"] == cid and info["State"]["Running"] and info["State"]["Pid"]
    assert info["Name"] == f"/pz{os.getpid()}" and info["Config"]["Image"] == "probe"
    assert info["HostConfig"]["NetworkMode"] == "bridge"
    assert info["NetworkSettings"]["IPAddress"].startswith("10.89.")
    cli("kill", cid)
    cli("wait", cid)
    info = json.loads(cli("inspect", cid).out)[0]
    assert info["State"]["Status"] == "exited" and info["State"]["ExitCode"] == 137
    p = cli("inspect", "nosuchthing", check=False)
    assert p.returncode == 125 and "no container has that name or ID either" in p.err


def test_start_and_restart_keep_the_writable_layer(detached):
    cli = detached.cli
    name = f"again{os.getpid()}"
    p = cli("run", "--name", name, "probe", "sh", "-c", "echo run >> /runs; cat /runs")
    assert p.out == "run\n"
    try:
        assert cli("start", name).out == f"{name}\n"
        assert cli("wait", name).out == "0\n"
        assert cli("logs", name).out == "run\nrun\n"  # the same upper layer, run again
        cid = json.loads(cli("inspect", "--type", "container", name).out)[0]["Id"]
        assert _state(cli, cid)["name"] == name
        cli("rm", name)
        cid = detached("--name", f"r{name}", "probe", "sh", "-c", TRAP_TERM).out.strip()
        _until(lambda: "ready" in cli("logs", cid).out)
        first = _state(cli, cid)["pid"]
        assert cli("restart", cid).out == f"{cid}\n"
        _until(lambda: cli("logs", cid).out.count("ready") == 2)
        assert "got-term" in cli("logs", cid).out
        state = _state(cli, cid)
        assert state["status"] == "running" and state["pid"] != first
        p = cli("start", "nosuchcontainer", check=False)
        assert p.returncode == 125 and "no such container" in p.err
    finally:
        cli("rm", "-f", name, check=False)


def test_start_runs_the_image_it_was_made_from(detached, tmp_path):
    cli = detached.cli
    tag = f"startimg{os.getpid()}"
    for word in ("one", "two"):
        (tmp_path / word).mkdir()
        (tmp_path / word / "Containerfile").write_text(f"FROM probe\nRUN echo {word} > /which\n")
    cli("build", "-q", "-t", tag, str(tmp_path / "one"))
    name = f"made{os.getpid()}"
    try:
        assert cli("run", "--name", name, tag, "cat", "/which").out == "one\n"
        cli("build", "-q", "-t", tag, str(tmp_path / "two"))  # the name moves on
        cli("start", name)
        assert cli("wait", name).out == "0\n"
        assert cli("logs", name).out == "one\n"  # kiln logs keeps what ran detached
    finally:
        cli("rm", "-f", name, check=False)


def test_d_with_i_or_t_keeps_a_shell_waiting(detached):
    """docker run -dit IMAGE sh: the shell waits on its open terminal (or, with -i, its
    open stdin) instead of exiting at once; its prompt is in the logs."""
    cli = detached.cli
    plain = detached("probe", "sh").out.strip()
    assert cli("wait", plain).out == "0\n"  # without -i/-t sh reads EOF and exits
    tty = detached("-it", "probe", "sh").out.strip()
    stdin = detached("-i", "probe", "sh").out.strip()
    time.sleep(0.5)
    for cid in (tty, stdin):
        assert _state(cli, cid)["status"] == "running"
    assert cli("exec", tty, "readlink", "/proc/1/fd/0").out.startswith("/dev/pts/")
    assert cli("exec", stdin, "readlink", "/proc/1/fd/0").out.startswith("pipe:")
    cli("exec", tty, "sh", "-c", "echo through-the-pty > /proc/1/fd/1")
    logs = _until(lambda: (out := cli("logs", tty).out) and "through-the-pty" in out and out)
    assert "/ # " in logs  # the interactive shell's prompt, written to its terminal
    assert cli("stop", "-t", "1", tty).out == f"{tty}\n"
    assert _state(cli, tty)["status"] == "exited"


def test_exec_with_a_terminal(detached, run_root):
    import shlex
    import shutil
    import subprocess

    from tests.runtime.conftest import kiln_argv

    if not shutil.which("script"):
        pytest.skip("script (bsdutils) is needed to give kiln exec a terminal")
    cid = detached("probe", "sleep", "30").out.strip()
    cmd = shlex.join(kiln_argv(run_root, "exec", "-it", cid, "sh", "-c",
                               "tty; test -t 0 && echo stdin-is-a-tty"))
    p = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.replace("\r", "").split("\n")
    assert lines[0].startswith("/dev/pts/") and "stdin-is-a-tty" in lines
