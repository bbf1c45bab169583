"""kiln's exec and init stubs (runtime/exec_stub.py), run as the host runs them: x86_64
natively, aarch64 under qemu-user (whose execve hands host binaries to the host kernel), and
the embedded bytes checked against their assembly sources."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from runtime.exec_stub import STUBS

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _runners() -> list:
    runners = []
    if platform.machine() in STUBS:
        runners.append(pytest.param((platform.machine(), None), id=platform.machine()))
    for arch, qemu in (("aarch64", "qemu-aarch64"), ("x86_64", "qemu-x86_64")):
        if arch != platform.machine():
            runners.append(pytest.param((arch, qemu), id=f"{arch}-qemu"))
    return runners


@pytest.fixture(params=_runners())
def stub_files(request, tmp_path):
    arch, qemu = request.param
    if qemu and not shutil.which(qemu):
        pytest.fail(f"{qemu} is needed to run the {arch} stubs (tests/setup-and-run.sh "
                    "installs qemu-user)")
    files = {}
    for kind, data in STUBS[arch].items():
        path = tmp_path / f"{arch}-{kind}"
        path.write_bytes(bytes.fromhex(data))
        path.chmod(0o755)
        files[kind] = path
    return files, qemu


def run_stub(stub: Path, qemu: str | None, argv: list[str], *, fd3: bool = True,
             send: int | None = None, ready: bytes | None = None):
    """(exit code, stdout, what reached fd 3). ``argv[0]`` is the program's path."""
    r, w = os.pipe()

    def give_fd3():
        if fd3:
            os.dup2(w, 3)

    cmd = [qemu, "-0", argv[0], str(stub), *argv[1:]] if qemu else argv
    p = subprocess.Popen(cmd, executable=None if qemu else str(stub), preexec_fn=give_fd3,
                         close_fds=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "K": "from-env"})
    os.close(w)
    if send is not None:
        assert p.stdout is not None
        assert p.stdout.readline() == ready
        p.send_signal(send)
    out, _ = p.communicate(timeout=30)
    with os.fdopen(r, "rb") as f:
        reported = f.read()
    if send is not None:
        out = ready + out
    return p.returncode, out, reported


@pytest.mark.parametrize("kind", ["exec", "init"])
def test_runs_the_program_with_its_argv_and_env(stub_files, kind):
    files, qemu = stub_files
    code, out, reported = run_stub(files[kind], qemu,
                                   ["/bin/sh", "sh", "-c", 'echo "$0 $1 $K"; exit 7', "zero",
                                    "one"])
    assert (code, out, reported) == (7, b"zero one from-env\n", b"")


@pytest.mark.parametrize("kind", ["exec", "init"])
def test_the_error_pipe_is_closed_in_the_program(stub_files, kind):
    files, qemu = stub_files
    code, out, _ = run_stub(files[kind], qemu, ["/bin/sh", "sh", "-c", "test -e /proc/self/fd/3;"
                                                " echo $?; grep -E 'SigBlk' /proc/self/status"])
    assert out.split() == [b"1", b"SigBlk:", b"0000000000000000"]


@pytest.mark.parametrize("kind", ["exec", "init"])
@pytest.mark.parametrize("path, code, err", [("/nonexistent", 127, 2), ("/etc/passwd", 126, 13)])
def test_a_failed_exec_is_reported_on_fd3(stub_files, kind, path, code, err):
    files, qemu = stub_files
    assert run_stub(files[kind], qemu, [path, "x"]) == (code, b"", bytes([0xFF, err]))


@pytest.mark.parametrize("kind", ["exec", "init"])
def test_without_fd3_it_refuses_to_run_anything(stub_files, kind):
    """What a '#!/proc/self/exe' script gets when it starts the stub a second time."""
    files, qemu = stub_files
    assert run_stub(files[kind], qemu, ["/bin/echo", "echo", "ran"], fd3=False)[:2] == (126, b"")


def test_init_forwards_signals_and_reports_deaths_by_signal(stub_files):
    files, qemu = stub_files
    trap = "trap 'echo TERM; exit 3' TERM; echo ready; while :; do sleep 0.05; done"
    assert run_stub(files["init"], qemu, ["/bin/sh", "sh", "-c", trap], send=signal.SIGTERM,
                    ready=b"ready\n")[:2] == (3, b"ready\nTERM\n")
    code, _, _ = run_stub(files["init"], qemu, ["/bin/sh", "sh", "-c", "echo ready; exec sleep 9"],
                          send=signal.SIGUSR1, ready=b"ready\n")
    assert code == 128 + signal.SIGUSR1


def test_init_reaps_orphans_and_waits_only_for_its_child(stub_files):
    files, qemu = stub_files
    start = time.monotonic()
    code, out, _ = run_stub(files["init"], qemu, ["/bin/sh", "sh", "-c",
                                                   "(sleep 0.2 &); sleep 0.4; echo done"])
    assert (code, out) == (0, b"done\n")
    assert time.monotonic() - start < 5


def test_the_embedded_stubs_are_their_sources_assembled():
    spec = importlib.util.spec_from_file_location("gen_exec_stub", TOOLS / "gen_exec_stub.py")
    gen = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(gen)
    for arch in STUBS:
        try:
            built = gen.assemble(arch)
        except SystemExit as e:
            pytest.fail(f"{e} (tests/setup-and-run.sh installs binutils for both)")
        assert {k: v.hex() for k, v in built.items()} == STUBS[arch], arch
