"""kiln run: what a user of docker/podman run would notice, on real containers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.runtime.conftest import kiln_argv


def test_echo_and_exit_codes(krun):
    p = krun("echo", "hello")
    assert (p.returncode, p.out) == (0, "hello\n")
    assert krun("sh", "-c", "exit 3").returncode == 3
    p = krun("nosuchcmd")
    assert p.returncode == 127 and "nosuchcmd: executable file not found in $PATH" in p.err
    p = krun("/bin/nö\nsuch")  # the reason crosses from PID 1 to kiln whole, newline and all
    assert p.returncode == 127 and "/bin/nö\nsuch: No such file or directory" in p.err
    p = krun("/notexec")
    assert p.returncode == 126 and "Permission denied" in p.err
    # PID 1 cannot be killed from inside its own namespace; with --init the program is PID 2
    assert krun("sh", "-c", "kill -9 $$", opts=("--init",)).returncode == 137


def test_missing_image_is_a_clear_error(krun):
    p = krun.cli("run", "--rm", "nosuch", "true", check=False)
    assert p.returncode == 125 and "kiln: error: image docker.io/library/nosuch:latest" in p.err


def test_env_workdir_hostname(krun, tmp_path):
    envfile = tmp_path / "env"
    envfile.write_text("# comment\nFROM_FILE=1\nOVERRIDE=file\n")
    p = krun("sh", "-c", "echo $FROM_FILE $OVERRIDE $FROM_HOST $HOSTNAME; pwd; hostname",
             opts=("--env-file", str(envfile), "-e", "OVERRIDE=flag", "-e", "FROM_HOST",
                   "-w", "/new/dir", "--hostname", "box1"),
             env={"FROM_HOST": "host-value"})
    assert p.out.split("\n")[:3] == ["1 flag host-value box1", "/new/dir", "box1"], p.err
    assert "PATH=/usr/local/sbin" in krun("env").out


@pytest.mark.parametrize("user, want", [
    ("", "uid=0(root) gid=0(root) groups=0(root)"),
    ("nobody", "uid=65534(nobody) gid=65534(nogroup) groups=65534(nogroup)"),
    ("app", "uid=1000(app) gid=1000(app) groups=1000(app),2000(extra)"),
    ("1000:2000", "uid=1000(app) gid=2000(extra) groups=2000(extra)"),
    ("4242", "uid=4242 gid=0(root) groups=0(root)"),
])
def test_users(krun, user, want):
    """As docker run: the groups that list the user, and its primary group (moby's getUser
    puts it first in AdditionalGids; BuildKit's RUN does the same: ensureAdditionalGids)."""
    opts = ("-u", user) if user else ()
    p = krun("id", opts=opts)
    assert p.out.strip() == want, p.out + p.err


@pytest.mark.parametrize("user, message", [
    ("nosuchuser", "unable to find user nosuchuser"),
    ("4294967296", "out of range"),
    ("app:nosuchgroup", "unable to find group nosuchgroup"),
])
def test_bad_users_fail_clearly(krun, user, message):
    p = krun("id", opts=("-u", user))
    assert p.returncode == 125 and message in p.err


def test_volumes_rw_ro_and_symlinks_stay_inside(krun, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "in").write_text("from host")
    p = krun("sh", "-c", "cat /data/in; echo out > /data/out", opts=("-v", f"{data}:/data"))
    assert p.out == "from host" and (data / "out").read_text() == "out\n"
    p = krun("sh", "-c", "echo x > /data/nope", opts=("-v", f"{data}:/data:ro"))
    assert p.returncode != 0 and "Read-only file system" in p.err
    assert not (data / "nope").exists()
    # /etc/escape -> / in the image: the target resolves inside the rootfs, not on the host
    host_target = "/kiln-test-must-not-exist"
    p = krun("sh", "-c", "cat /kiln-test-must-not-exist/in",
             opts=("-v", f"{data}:/etc/escape{host_target}"))
    assert p.out == "from host", p.err
    assert not os.path.exists(host_target)


def test_read_only_root_and_tmpfs(krun):
    p = krun("sh", "-c", "touch /x", opts=("--read-only",))
    assert p.returncode != 0 and "Read-only file system" in p.err
    p = krun("sh", "-c", "touch /scratch/x && echo ok", opts=("--read-only", "--tmpfs",
                                                               "/scratch"))
    assert p.out == "ok\n"


def test_rm_ps_and_kept_containers(krun, run_root):
    cli = krun.cli
    assert cli("run", "--name", "keeper", "probe", "sh", "-c", "echo kept > /f").returncode == 0
    rows = json.loads(cli("ps", "-a", "--format", "json").out)
    mine = [r for r in rows if r["name"] == "keeper"]
    assert mine and mine[0]["exit_code"] == 0
    upper = run_root / "containers" / mine[0]["id"] / "upper"
    assert (upper / "f").read_text() == "kept\n"
    assert "keeper" not in cli("ps").out  # not running
    p = cli("run", "--name", "keeper", "probe", "true", check=False)
    assert p.returncode == 125 and "already in use" in p.err
    cli("rm", "keeper")
    assert not upper.exists()
    before = set(os.listdir(run_root / "containers"))
    krun("true")
    assert set(os.listdir(run_root / "containers")) == before


def test_tty_with_window_size(run_root):
    import fcntl
    import pty
    import struct
    import termios

    pid, master = pty.fork()
    if pid == 0:
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
        os.execv(kiln_argv(run_root, "run", "--rm", "-t", "probe", "sh", "-c",
                           "tty; stty size")[0],
                 kiln_argv(run_root, "run", "--rm", "-t", "probe", "sh", "-c",
                           "tty; stty size"))
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert "/dev/pts/0" in text and "33 111" in text, text
    assert os.waitstatus_to_exitcode(status) == 0


def test_sigterm_is_forwarded_and_stop_timeout_kills(run_root):
    p = subprocess.Popen(kiln_argv(run_root, "run", "--rm", "probe", "sh", "-c",
                                   "trap 'echo got TERM; exit 7' TERM; echo ready; "
                                   "while true; do sleep 0.1; done"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline() == b"ready\n"
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=20)
    assert p.returncode == 7 and b"got TERM" in out
    # PID 1 without a handler ignores SIGTERM: --stop-timeout then SIGKILL
    p = subprocess.Popen(kiln_argv(run_root, "run", "--rm", "--stop-timeout", "1", "probe",
                                   "sh", "-c", "echo ready; exec sleep 100"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline() == b"ready\n"
    start = time.monotonic()
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=20)
    assert p.returncode == 137 and time.monotonic() - start < 10


def test_init_reaps_and_forwards(run_root, krun):
    p = krun("sh", "-c", "sleep 0.1 & sleep 0.1 & wait; ps -o pid,comm | head -3",
             opts=("--init",))
    assert p.returncode == 0, p.err
    p = subprocess.Popen(kiln_argv(run_root, "run", "--rm", "--init", "probe", "sh", "-c",
                                   "echo ready; exec sleep 100"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline() == b"ready\n"
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=20)
    assert p.returncode == 143  # sleep (not PID 1) dies of the forwarded SIGTERM


def test_stdin_only_with_interactive(run_root):
    p = subprocess.run(kiln_argv(run_root, "run", "--rm", "-i", "probe", "cat"),
                       input=b"piped in\n", capture_output=True)
    assert p.stdout == b"piped in\n"
    p = subprocess.run(kiln_argv(run_root, "run", "--rm", "probe", "cat"),
                       input=b"not for you\n", capture_output=True)
    assert p.stdout == b""


def test_default_dev_and_etc(krun):
    p = krun("sh", "-c", "ls /dev | tr '\\n' ' '; echo; df -k /dev/shm | tail -1; "
             "cat /etc/hostname; grep localhost /etc/hosts | head -1; readlink /dev/fd",
             opts=("--hostname", "h1"))
    devs = p.out.splitlines()[0].split()
    for name in ("null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm",
                 "mqueue", "fd", "stdin", "stdout", "stderr"):
        assert name in devs, (name, devs)
    assert p.out.splitlines()[1].split()[1] == "65536"  # 64 MiB
    assert p.out.splitlines()[2:] == ["h1", "127.0.0.1\tlocalhost", "/proc/self/fd"]


def test_network_host_sees_host_interfaces(krun):
    host = sorted(os.listdir("/sys/class/net"))
    p = krun("ls", "/sys/class/net", opts=("--network", "host"))
    assert sorted(p.out.split()) == host


def test_interactive_shell_under_tmux(run_root, tmp_path):
    import shutil

    if not shutil.which("tmux"):
        pytest.fail("tmux is needed (tests/setup-and-run.sh installs it)")
    sock = str(tmp_path / "tmux.sock")
    cmd = " ".join(kiln_argv(run_root, "run", "--rm", "-it", "probe", "sh"))
    tmux = ["tmux", "-S", sock]
    subprocess.run(tmux + ["new-session", "-d", "-x", "90", "-y", "20", cmd], check=True)
    try:
        def screen():
            return subprocess.run(tmux + ["capture-pane", "-p"], capture_output=True,
                                  text=True).stdout

        deadline = time.monotonic() + 20
        while "#" not in screen() and time.monotonic() < deadline:
            time.sleep(0.1)
        subprocess.run(tmux + ["send-keys", "echo $((6*7)); stty size", "Enter"], check=True)
        while "42" not in screen() and time.monotonic() < deadline:
            time.sleep(0.1)
        text = screen()
        assert "42" in text and "20 90" in text, text
        subprocess.run(tmux + ["send-keys", "exit", "Enter"], check=True)
        while time.monotonic() < deadline:
            if subprocess.run(tmux + ["has-session"], capture_output=True).returncode != 0:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the container shell did not exit")
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True)


@pytest.fixture(scope="module")
def entry_root(tmp_path_factory, probe_rootfs):
    """An image whose config has ENTRYPOINT ["echo", "E"] and CMD ["C"]."""
    import io
    import tarfile

    from store.store import Store
    from store.transfer import load
    from tests.store.test_hostile_images import make_layout

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        t.add(str(probe_rootfs), arcname=".")
    base = tmp_path_factory.mktemp("entry")
    store = Store(base / "root")
    load(store, make_layout(base / "layout", layers=[buf.getvalue()], config_patch={
        "config": {"Entrypoint": ["echo", "E"], "Cmd": ["C"], "Env": ["PATH=/bin"],
                   "WorkingDir": "/tmp", "User": "nobody"}}))
    return store.root


@pytest.mark.parametrize("args, want", [
    ([], "E C"),
    (["A1", "A2"], "E A1 A2"),
    (["--entrypoint", "echo"], ""),
    (["--entrypoint", "echo", "X"], "X"),
    (["--entrypoint", "", "echo", "Y"], "Y"),
])
def test_entrypoint_and_cmd_follow_docker(entry_root, args, want):
    from tests.conftest import KilnCLI

    cli = KilnCLI(entry_root)
    opts = [a for a in args[:2] if args and args[0] == "--entrypoint"]
    rest = args[2:] if opts else args
    p = cli("run", "--rm", *opts, "evil:1", *rest)
    assert p.out == want + "\n"


def test_image_workdir_and_user_are_defaults(entry_root):
    from tests.conftest import KilnCLI

    cli = KilnCLI(entry_root)
    assert cli("run", "--rm", "--entrypoint", "pwd", "evil:1").out == "/tmp\n"
    assert cli("run", "--rm", "--entrypoint", "id", "evil:1").out.startswith("uid=65534")
    assert cli("run", "--rm", "-u", "0", "--entrypoint", "id", "evil:1").out.startswith("uid=0")


def test_no_command_at_all_is_a_clear_error(krun):
    p = krun.cli("run", "--rm", "probe", check=False)
    assert p.returncode == 125 and "no command specified" in p.err


def test_no_cgroup_is_left_behind(krun):
    before = {p for p in os.popen("find /sys/fs/cgroup -maxdepth 6 -name 'kiln-*' -type d")}
    krun("true", opts=("--memory", "64m", "--pids-limit", "50", "--cpus", "0.5"))
    after = {p for p in os.popen("find /sys/fs/cgroup -maxdepth 6 -name 'kiln-*' -type d")}
    assert after <= before
