"""Ctrl-C and SIGTERM of kiln build, pull and push (issue 10, point 7).

A terminal's Ctrl-C sends SIGINT to the whole foreground process group (``os.killpg``
here); ``kill -INT PID`` sends it to kiln alone (``os.kill``); a CI system cancelling a
job sends SIGTERM (``kill -TERM PID``). Either way kiln must stop within a second, say
one line, ``kiln: interrupted`` (exit 130) or ``kiln: terminated`` (exit 143), with no
traceback and no step blamed, kill what it started (a RUN's processes, the COPY helper)
and remove its cgroups, leave no mount and no tag behind, and leave its store's tmp/
empty when it exits.
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from registry_client.push import push
from registry_client.transport import RegistryOptions
from store.store import Store
from tests.builder.conftest import build_context
from tests.conftest import PROJECT, KilnCLI
from tests.registry.conftest import fault_proxy, registry  # noqa: F401 - fixtures
from tests.registry.faults import slow_drip, stall, status
from tests.runtime.conftest import kiln_argv

HOW = {"terminal": lambda pid: os.killpg(pid, signal.SIGINT),
       "kill -INT": lambda pid: os.kill(pid, signal.SIGINT),
       "kill -TERM": lambda pid: os.kill(pid, signal.SIGTERM)}
CTRL_C = ("terminal", "kill -INT")
REPORTED = {"terminal": (130, "kiln: interrupted"), "kill -INT": (130, "kiln: interrupted"),
            "kill -TERM": (143, "kiln: terminated")}  # 128 + the signal's number
# a pull or push stops at once, whatever its threads were blocked on; slack for a slow,
# busy 2-core machine
STOP_WITHIN = 1.5


class Started:
    """``kiln ARGS`` started as a shell starts a foreground job: its own process group."""

    running: list[Started] = []

    def __init__(self, root: Path, tmp_path: Path, *args: str):
        self.root = root
        self.out_path, self.err_path = tmp_path / "kiln.out", tmp_path / "kiln.err"
        env = {**os.environ, "HOME": str(tmp_path / "home"),
               "XDG_RUNTIME_DIR": str(tmp_path / "run"),
               "XDG_CONFIG_HOME": str(tmp_path / "config")}
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(kiln_argv(root, *args), stdout=out, stderr=err,
                                         cwd=PROJECT, env=env, start_new_session=True)
        Started.running.append(self)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(
            errors="replace")

    def wait_until(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"kiln ended ({self.proc.returncode}) before {what}:\n"
                            f"{self.output()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {what} after {timeout}s:\n{self.output()}")
            time.sleep(0.02)

    def interrupt(self, how: str) -> float:
        HOW[how](self.proc.pid)
        return time.monotonic()

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"kiln still runs {timeout}s after Ctrl-C:\n{self.output()}")
        return code, self.err_path.read_text(errors="replace")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture(autouse=True)
def _no_kiln_left_behind():
    """A test that fails before its Ctrl-C leaves no kiln running (and its containers die
    with it)."""
    yield
    while Started.running:
        kiln = Started.running.pop()
        if kiln.proc.poll() is None:
            kiln.kill()


def assert_reported_as_interrupted(code: int, err: str, how: str = "terminal", *,
                                   log: bool = False) -> None:
    """kiln's whole stderr is its one line (after the build's log, with ``log``): no
    traceback, no step blamed, and no blank line before it."""
    want_code, line = REPORTED[how]
    assert code == want_code, err
    if log:
        assert err.endswith("\n" + line + "\n") and err.count(line) == 1, err
        assert "" not in err.splitlines(), err  # the log has no blank line either
        assert "Traceback" not in err and "kiln: error" not in err, err
        assert "exited with code" not in err and "failed" not in err, err  # no step blamed
    else:
        assert err == line + "\n"


def assert_stopped_at_once(sent: float, err: str) -> None:
    took = time.monotonic() - sent
    assert took < STOP_WITHIN, f"kiln took {took:.2f}s to stop:\n{err}"


def pids_with(token: str) -> dict[int, str]:
    """The processes that mention ``token`` (what a test started): pid -> command line."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if token.encode() in cmdline:
            found[int(pid)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def processes_with(token: str) -> list[str]:
    """Command lines of the processes that mention ``token``."""
    return list(pids_with(token).values())


def kiln_cgroups_of(pid: int) -> list[str]:
    """The cgroup directories kiln made that process ``pid`` is in (v1 hierarchies and v2;
    runtime/cgroups.py puts them under a ``kiln/`` parent)."""
    dirs = []
    with open(f"/proc/{pid}/cgroup") as f:
        for entry in f:
            _, controllers, path = entry.rstrip("\n").split(":", 2)
            if "/kiln/" not in path:
                continue
            mounts = [c.removeprefix("name=") for c in controllers.split(",")] if (
                controllers) else ["", "unified"]
            dirs += [d for m in mounts
                     if os.path.isdir(d := os.path.join("/sys/fs/cgroup", m, path.lstrip("/")))]
    return dirs


def assert_nothing_left(root: Path, token: str | None = None) -> None:
    """No process of the test's, no mount under the store; a later kiln command finds tmp/
    empty after its start-up clean-up (or it was empty already)."""
    if token is not None:
        deadline = time.monotonic() + 5  # a killed pid namespace takes a moment to go
        while processes_with(token) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with(token) == []
    with open("/proc/self/mountinfo") as f:
        assert str(root) not in f.read()
    KilnCLI(root)("images")
    assert os.listdir(root / "tmp") == []


def token() -> str:
    """A number for `sleep` that no other process on the machine has on its command line."""
    return str(random.randrange(10**8, 10**9))


# ------------------------------------------------------------------------------ build
@pytest.mark.parametrize("how", HOW)
def test_ctrl_c_of_a_build_during_a_run_step(broot, tmp_path, how):
    sleep = token()
    ctx = build_context(tmp_path, "FROM busybox\nRUN echo step-$((40+2)) running; "
                                  f"sleep {sleep}\n")
    before = os.listdir(broot / "tmp")
    kiln = Started(broot, tmp_path, "build", "-t", "interrupted-run", str(ctx))
    kiln.wait_until(lambda: "step-42 running" in kiln.output(), "RUN step output")
    kiln.wait_until(lambda: processes_with(sleep), "the RUN step's sleep")
    cgroups = kiln_cgroups_of(next(iter(pids_with(sleep))))
    assert cgroups  # the RUN step's own, where its processes are counted and limited
    sent = kiln.interrupt(how)
    code, err = kiln.finish()
    assert time.monotonic() - sent < 5  # the RUN's process is killed, not waited for
    assert_reported_as_interrupted(code, err, how, log=True)
    assert os.listdir(broot / "tmp") == before  # cleaned at once
    assert [d for d in cgroups if os.path.exists(d)] == []
    assert_nothing_left(broot, sleep)
    assert "interrupted-run" not in KilnCLI(broot)("images").out


@pytest.mark.parametrize("how", CTRL_C)
def test_ctrl_c_of_a_build_during_a_big_copy(broot, tmp_path, how):
    ctx = build_context(tmp_path, "FROM busybox\nCOPY big /big\n")
    block = random.randbytes(1 << 20)
    (ctx / "big").mkdir()
    for i in range(256):  # 256 MiB: the copy takes a while
        (ctx / "big" / f"{i:04d}").write_bytes(block[i:] + block[:i])
    before = os.listdir(broot / "tmp")
    kiln = Started(broot, tmp_path, "build", "-t", "interrupted-copy", str(ctx))
    kiln.wait_until(lambda: glob.glob(f"{broot}/tmp/step-*/upper/big/0*"), "copied file",
                    timeout=120)
    sent = kiln.interrupt(how)
    code, err = kiln.finish()
    assert time.monotonic() - sent < 5
    assert_reported_as_interrupted(code, err, how, log=True)
    assert os.listdir(broot / "tmp") == before
    assert_nothing_left(broot)
    assert "interrupted-copy" not in KilnCLI(broot)("images").out
    shutil.rmtree(ctx / "big")  # pytest keeps the last runs' tmp_path


@pytest.mark.parametrize("how", CTRL_C)
def test_ctrl_c_of_a_build_with_stages_in_parallel(broot, tmp_path, how):
    sleep = token()
    ctx = build_context(tmp_path, f"""\
FROM busybox AS one
RUN echo one-$((40+2)) running; sleep {sleep}
FROM busybox AS two
RUN echo two-$((40+2)) running; sleep {sleep}
FROM busybox
COPY --from=one /etc/passwd /one
COPY --from=two /etc/passwd /two
""")
    before = os.listdir(broot / "tmp")
    kiln = Started(broot, tmp_path, "build", "-t", "interrupted-stages", str(ctx))
    kiln.wait_until(lambda: "one-42 running" in kiln.output() and
                    "two-42 running" in kiln.output(), "both stages' RUN output")
    kiln.wait_until(lambda: len(processes_with(sleep)) == 2, "both stages' sleep")
    sent = kiln.interrupt(how)
    code, err = kiln.finish()
    assert time.monotonic() - sent < 5
    assert_reported_as_interrupted(code, err, how, log=True)
    assert os.listdir(broot / "tmp") == before
    assert_nothing_left(broot, sleep)
    assert "interrupted-stages" not in KilnCLI(broot)("images").out


# GitHub Actions cancels a job with SIGINT, then SIGTERM 7.5 s later if it still runs
@pytest.mark.parametrize("then", ["terminal", "kill -TERM"])
def test_more_signals_while_the_build_stops_change_nothing(broot, tmp_path, then):
    sleep = token()
    ctx = build_context(tmp_path, f"FROM busybox\nRUN echo step-$((40+2)) running; "
                                  f"sleep {sleep}\n")
    kiln = Started(broot, tmp_path, "build", "-t", "interrupted-twice", str(ctx))
    kiln.wait_until(lambda: "step-42 running" in kiln.output(), "RUN step output")
    kiln.interrupt("terminal")
    for _ in range(5):
        time.sleep(0.01)
        kiln.interrupt(then)
    code, err = kiln.finish()
    assert_reported_as_interrupted(code, err, "terminal", log=True)  # the first one counts
    assert_nothing_left(broot, sleep)
    assert "interrupted-twice" not in KilnCLI(broot)("images").out


# ------------------------------------------------------------------------ pull, push
def registry_options(tmp_path: Path) -> RegistryOptions:
    return RegistryOptions(env={"HOME": str(tmp_path / "home"), "PATH": os.environ["PATH"]})


@pytest.fixture(scope="module")
def images(broot, registry, tmp_path_factory):  # noqa: F811 - the fixture
    """busybox (one layer) and busybox plus two COPY layers, in the store and the registry."""
    tmp = tmp_path_factory.mktemp("images")
    ctx = build_context(tmp, "FROM busybox\nCOPY a /a\nCOPY b /b\n",
                        {"a": random.randbytes(1 << 20), "b": random.randbytes(1 << 20)})
    KilnCLI(broot)("build", "-t", "three-layers", str(ctx))
    store = Store(broot)
    names = {"one layer": "busybox:latest", "three layers": "three-layers:latest"}
    for name in names.values():
        push(store, name, f"{registry.host}/interrupt/{name}", registry_options(tmp))
    return {case: (name, [la.digest for la in store.image(name).layers()])
            for case, name in names.items()}


# the registry sends the layers' first KiB, then a KiB every 50 ms, or nothing more
DRIPS = {"dripping": 0.05, "silent": 60}


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("registry_is", DRIPS)
@pytest.mark.parametrize("image", ["one layer", "three layers"])
def test_signal_stops_a_pull_at_once(images, fault_proxy, tmp_path,  # noqa: F811
                                     how, registry_is, image):
    name, layers = images[image]
    fault_proxy.add(slow_drip(DRIPS[registry_is], 1024, path="|".join(layers), times=None,
                              give_up_after=60))
    root = tmp_path / "pulled"
    ref = f"{fault_proxy.host}/interrupt/{name}"
    kiln = Started(root, tmp_path, "pull", ref)
    kiln.wait_until(lambda: any(r["method"] == "GET" and layers[0] in r["path"]
                                for r in fault_proxy.requests), "layer download")
    time.sleep(0.3)  # bytes trickle in, or kiln waits for them
    sent = kiln.interrupt(how)
    code, err = kiln.finish()
    assert_stopped_at_once(sent, err)
    assert os.listdir(root / "tmp") == []  # kiln cleaned up itself, not the next command
    assert_reported_as_interrupted(code, err, how)
    assert_nothing_left(root)
    store = Store(root)
    assert store.tags() == [] and store.layer_diff_ids_on_disk() == []


# the registry asks to come back in 30 s for every upload (kiln waits to retry), or never
# answers the upload's start (kiln waits for the status line)
PUSH_FAULTS = {
    "retrying": lambda: status(503, retry_after=30, method="POST", path="/blobs/uploads/",
                               times=None),
    "silent": lambda: stall(60, method="POST", path="/blobs/uploads/", times=None)}


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("registry_is", PUSH_FAULTS)
@pytest.mark.parametrize("image", ["one layer", "three layers"])
def test_signal_stops_a_push_at_once(broot, images, fault_proxy, tmp_path,  # noqa: F811
                                     how, registry_is, image):
    name, _layers = images[image]
    fault_proxy.add(PUSH_FAULTS[registry_is]())
    before = os.listdir(broot / "tmp")
    kiln = Started(broot, tmp_path, "push", name,
                   f"{fault_proxy.host}/interrupted-push/{token()}:1")
    kiln.wait_until(lambda: any(r["method"] == "POST" for r in fault_proxy.requests),
                    "blob upload")
    time.sleep(0.2)
    sent = kiln.interrupt(how)
    code, err = kiln.finish()
    assert_stopped_at_once(sent, err)
    assert os.listdir(broot / "tmp") == before
    assert_reported_as_interrupted(code, err, how)
    assert_nothing_left(broot)
